"""Settings: read once from the environment (and CLI flags), validated, then passed in."""

from __future__ import annotations

import base64
import binascii
import codecs
import difflib
import hashlib
import hmac
import ipaddress
import os
import re
import urllib.parse
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from sideband.upstream.openai import sideband_url

__all__ = ["Settings", "SettingsError", "load_settings"]


class SettingsError(Exception):
    """A missing or malformed setting. ``str(err)`` is one line naming the variable."""


def _env(name: str, default: Any = None) -> Any:
    return Field(default=default, validation_alias=AliasChoices(name))


_BLANK_IS_A_VALUE = frozenset({"SIDEBAND_HOST"})
"""Variables whose blank value means something: ``SIDEBAND_HOST=`` listens on both address families."""
# A Redis URL's query options that would replace the claim store's own bounds (see RedisStore).
_STORE_BOUNDS = frozenset({"socket_timeout", "socket_connect_timeout", "max_connections", "timeout"})
# Those it may set: redis-py reads the others as text, where it wants an object (a traceback at start).
_URL_OPTIONS = frozenset(
    {
        *("db", "client_name", "lib_name", "lib_version", "username", "password", "encoding"),
        *("encoding_errors", "health_check_interval", "legacy_responses", "protocol", "retry_on_timeout"),
        *("socket_keepalive", "socket_read_size", "ssl_ca_certs", "ssl_ca_data", "ssl_ca_path"),
        *("ssl_certfile", "ssl_cert_reqs", "ssl_check_hostname", "ssl_ciphers", "ssl_exclude_verify_flags"),
        *("ssl_include_verify_flags", "ssl_keyfile", "ssl_min_version", "ssl_password"),
    }
)


class _Given(PydanticBaseSettingsSource):
    """Another source's values, less the blank ones (``""``, whitespace): an optional setting set blank
    (``SIDEBAND_PORT=``, ``${SIDEBAND_PORT:-}`` in a compose file) is not set and takes its default, and a
    required one set blank is reported as not set. Both sources key their values by the variables'
    names; those in :data:`_BLANK_IS_A_VALUE` keep a blank value."""

    def __init__(self, source: PydanticBaseSettingsSource) -> None:
        super().__init__(source.settings_cls)
        self._source = source

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self._source.get_field_value(field, field_name)

    def __call__(self) -> dict[str, Any]:
        return {
            name: value
            for name, value in self._source().items()
            if name in _BLANK_IS_A_VALUE or not (isinstance(value, str) and not value.strip())
        }


class _ContractEnvironment(PydanticBaseSettingsSource):
    """The process environment under the documented names only (``OPENAI_API_KEY``,
    ``OPENAI_WEBHOOK_SECRET``, ``OPENAI_BASE_URL``, ``SIDEBAND_*``; exact case).

    pydantic-settings' own environment source also reads a field's *name* when fields may be populated
    by name (``PORT``, ``HOST``, ``LOG_LEVEL``, …, in any case): unrelated variables of the deployment
    would silently become settings."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        name = _alias(field)
        return os.environ.get(name), name, False

    def __call__(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for field_name, field in self.settings_cls.model_fields.items():
            value, name, _ = self.get_field_value(field, field_name)
            if value is not None:
                values[name] = value
        return values


class Settings(BaseSettings):
    """Every knob of the service. Environment names are part of the contract (see README).

    ``Settings(port=9000)`` (field names, as CLI flags and embedding code pass them) and
    ``Settings(SIDEBAND_PORT="9000")`` both work and win over the environment; from the environment only the
    documented names are read."""

    # (hide_input_in_errors: a malformed secret must not be quoted in the error that names it)
    model_config = SettingsConfigDict(
        extra="forbid", frozen=True, populate_by_name=True, hide_input_in_errors=True, allow_inf_nan=False
    )

    openai_api_key: SecretStr | None = _env("OPENAI_API_KEY")
    openai_webhook_secret: SecretStr | None = _env("OPENAI_WEBHOOK_SECRET")
    openai_base_url: str = _env("OPENAI_BASE_URL", "https://api.openai.com/v1")

    host: str = _env("SIDEBAND_HOST", "0.0.0.0")  # noqa: S104 - a server listens on all interfaces
    port: int = Field(default=8080, ge=0, le=65535, validation_alias=AliasChoices("SIDEBAND_PORT"))
    log_format: Literal["json", "console"] | None = _env("SIDEBAND_LOG_FORMAT")
    log_level: Literal["debug", "info", "warning", "error"] | None = _env("SIDEBAND_LOG_LEVEL")
    """``None`` when unset: each command picks its default (``serve``: info; ``dial``: warning)."""
    log_tool_arguments: bool = _env("SIDEBAND_LOG_TOOL_ARGUMENTS", False)
    log_transcripts: bool = _env("SIDEBAND_LOG_TRANSCRIPTS", True)
    """False (say, on a payment line): ``transcript`` lines carry role and length, ``dtmf`` no digit."""

    # (Every duration has a ceiling far above any sensible value: an absurd one, 1e16 s, would overflow
    # the store's millisecond TTLs and refuse every webhook, after a clean start.)
    webhook_max_body: int = Field(
        default=256 * 1024, gt=0, le=64 * 2**20, validation_alias="SIDEBAND_WEBHOOK_MAX_BODY"
    )
    webhook_tolerance: float = Field(  # (at most an hour: far inside the claims' 72 h)
        default=300.0, gt=0, le=3600.0, validation_alias="SIDEBAND_WEBHOOK_TOLERANCE"
    )
    dedup_ttl: float = Field(
        default=72 * 3600.0, ge=72 * 3600.0, le=30 * 86400.0, validation_alias="SIDEBAND_DEDUP_TTL"
    )

    accept_attempt_timeout: float = Field(
        default=2.0, gt=0, le=60.0, validation_alias="SIDEBAND_ACCEPT_TIMEOUT"
    )
    accept_budget: float = Field(default=4.0, gt=0, le=60.0, validation_alias="SIDEBAND_ACCEPT_BUDGET")
    route_budget: float = Field(default=1.0, gt=0, le=60.0, validation_alias="SIDEBAND_ROUTE_BUDGET")
    route_failure_status: int = Field(
        default=480, ge=400, le=699, validation_alias="SIDEBAND_ROUTE_FAILURE_STATUS"
    )
    routes_file: Path | None = _env("SIDEBAND_ROUTES_FILE")
    max_calls: int = Field(default=0, ge=0, le=1_000_000, validation_alias="SIDEBAND_MAX_CALLS")
    """Live calls this instance takes at most (0: no cap): more are rejected with :attr:`busy_status`."""
    busy_status: int = Field(default=486, ge=400, le=699, validation_alias="SIDEBAND_BUSY_STATUS")
    redis_url: SecretStr | None = _env("SIDEBAND_REDIS_URL")
    """The shared claim store of several instances (``redis://``, ``rediss://``, ``unix://``); unset: in
    memory, for one instance. Secret: its password must not reach logs or errors."""

    ws_compression: bool = _env("SIDEBAND_WS_COMPRESSION", False)
    reattach_attempts: int = Field(default=5, ge=0, le=100, validation_alias="SIDEBAND_REATTACH_ATTEMPTS")
    # (59 min: OpenAI cuts every session at 60 without a word; ours says goodbye first)
    max_call_duration: float = Field(
        default=3540.0, gt=0, le=86400.0, validation_alias="SIDEBAND_MAX_CALL_SECONDS"
    )
    max_idle_duration: float = Field(
        default=300.0, gt=0, le=86400.0, validation_alias="SIDEBAND_MAX_IDLE_SECONDS"
    )
    drain_timeout: float = Field(default=30.0, ge=0, le=3600.0, validation_alias="SIDEBAND_DRAIN_TIMEOUT")
    orphan_after: float = Field(default=30.0, ge=1.0, le=600.0, validation_alias="SIDEBAND_ORPHAN_AFTER")

    rtc_ticket_secret: SecretStr | None = _env("SIDEBAND_RTC_TICKET_SECRET")
    rtc_key_ttl: int = Field(default=600, ge=10, le=7200, validation_alias="SIDEBAND_RTC_KEY_TTL")

    vowel_core_url: str | None = _env("SIDEBAND_VOWEL_CORE_URL")
    vowel_engine_url: str | None = _env("SIDEBAND_VOWEL_ENGINE_URL")
    vowel_api_key: SecretStr | None = _env("SIDEBAND_VOWEL_API_KEY")
    vowel_service_id: str | None = _env("SIDEBAND_VOWEL_SERVICE_ID")
    vowel_provider: str = _env("SIDEBAND_VOWEL_PROVIDER", "vowel-prime")
    vowel_model: str | None = _env("SIDEBAND_VOWEL_MODEL")
    vowel_voice: str | None = _env("SIDEBAND_VOWEL_VOICE")

    @field_validator("*", mode="before")
    @classmethod
    def _trimmed(cls, value: Any) -> Any:
        """A value's surrounding whitespace is no part of it (a stray newline from a secrets file, a
        space after ``=``): ``SIDEBAND_HOST="127.0.0.1\n"`` would fail to listen, a routes file path
        would name no file."""
        return value.strip() if isinstance(value, str) else value

    @field_validator("openai_base_url", "vowel_core_url", "vowel_engine_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip().rstrip("/")
        if not value.startswith(("http://", "https://", "ws://", "wss://")):
            raise ValueError("must be an http(s):// or ws(s):// URL")
        if any(c.isspace() or not c.isprintable() for c in value):
            raise ValueError("must not contain spaces or control characters")
        if "?" in value or "#" in value:  # (paths are appended to it: /realtime, /realtime/calls/…)
            raise ValueError("must not have a query or fragment (?… or #…)")
        try:
            netloc = urllib.parse.urlsplit(value).netloc
        except ValueError:  # (an unbalanced or empty [IPv6 literal])
            raise ValueError("must name a host ([…] holds no IPv6 address)") from None
        if "@" in netloc:
            # (it would be logged, and its Basic credentials would clash with our bearer key)
            raise ValueError("must not carry a user or password (user:password@host)")
        _host_and_port(netloc)
        return value

    @field_validator("openai_api_key", "vowel_api_key", "rtc_ticket_secret")
    @classmethod
    def _secret(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        if value is None:
            return None
        raw = value.get_secret_value().strip()  # a stray newline from a secrets file is no part of it
        if not raw:
            # blank: not set (an error where a command needs it; a ticket key is then derived from the
            # webhook secret, never empty)
            return None
        if info.field_name == "rtc_ticket_secret":
            if len(raw) < 32:
                raise ValueError("must be at least 32 characters (e.g. `openssl rand -hex 32`)")
        elif not (raw.isascii() and raw.isprintable()) or any(c.isspace() for c in raw):
            # (it goes out in an Authorization header: anything else fails every request it is sent with)
            raise ValueError("must be an API key (printable ASCII, no spaces)")
        return SecretStr(raw)

    @field_validator("redis_url")
    @classmethod
    def _redis(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        raw = value.get_secret_value().strip()
        if not raw.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        # (no message quotes the URL or a piece of it: it holds the password)
        try:
            parts = urllib.parse.urlsplit(raw)
            parts.port  # noqa: B018 - parsed for its ValueError
        except ValueError:  # (its words quote what it could not read: a bracketed piece of a password)
            cut = True
        else:  # a / ? or # in the password ends the host part early: the rest lands in the path, and
            # the credentials' @ with it (an @ of a socket's path, after unix://…@ or unix:///, is the
            # path's own; in a query or fragment it is a password's, cut short)
            rest = raw.partition("://")[2][len(parts.netloc) :]
            if raw.startswith("unix://"):
                path = rest.partition("?")[0].partition("#")[0]
                cut = "@" in rest[len(path) :] or (
                    bool(parts.netloc) and "@" not in parts.netloc and "@" in path
                )
            else:
                cut = "@" in rest
        if cut:
            raise ValueError(
                "cannot be read: a user or password holding / ? # @ [ or ] must be percent-encoded (%2F %3F "
                "%23 %40 %5B %5D), or the port is not a number"
            )
        options = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
        own = sorted(_STORE_BOUNDS.intersection(options))
        if own:  # (redis-py lets the URL's options replace the store's own bounds)
            raise ValueError(
                f"must not set {', '.join(own)}: sideband sets its own bounds on each command and on its "
                "connections"
            )
        other = sorted(options.keys() - _URL_OPTIONS - {"retry", "retry_on_error"})  # (those: at start)
        for name, known in (("encoding", codecs.lookup), ("encoding_errors", codecs.lookup_error)):
            for given in options.get(name, ()):
                try:
                    known(given)
                except LookupError:
                    raise ValueError(f"{name}: no such {name.replace('_', ' ')} in Python") from None
        tls = sorted(name for name in options.keys() & _URL_OPTIONS if name.startswith("ssl_"))
        if tls and not raw.startswith("rediss://"):  # (redis-py refuses them on a plain connection)
            raise ValueError(f"cannot set {', '.join(tls)}: the ssl_… options need a rediss:// URL (TLS)")
        if other:
            # (quoted, as decoded: a %0A or %1B in a name is shown escaped, and the message stays one line)
            shown = ", ".join(repr(name) if len(name) <= 40 else repr(name[:40]) + "…" for name in other)
            raise ValueError(
                f"cannot set {shown}: the options a URL may set are {', '.join(sorted(_URL_OPTIONS))}"
            )
        db = parts.path.strip("/")  # (no host: redis-py's localhost)
        if raw.startswith(("redis://", "rediss://")) and db and not db.isdigit():
            raise ValueError("must end with a database number, if anything (/0)")
        return SecretStr(raw)

    @field_validator("openai_webhook_secret")
    @classmethod
    def _whsec(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        raw = value.get_secret_value().strip()
        body = raw.removeprefix("whsec_")
        try:
            if not base64.b64decode(body + "==", validate=False):
                raise ValueError
            base64.b64decode(body.rstrip("=") + "=" * (-len(body.rstrip("=")) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("must be a whsec_… secret (base64 after the prefix)") from None
        return SecretStr(raw)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (_Given(init_settings), _Given(_ContractEnvironment(settings_cls)))

    @property
    def sideband_url(self) -> str:
        """The sideband WebSocket base derived from ``OPENAI_BASE_URL`` (``https→wss``, ``http→ws``)."""
        return sideband_url(self.openai_base_url)

    def ticket_key(self) -> bytes:
        """Key that signs WebRTC handoff tickets: ``SIDEBAND_RTC_TICKET_SECRET`` or one derived
        from the webhook secret (so every instance sharing the secret agrees)."""
        if self.rtc_ticket_secret is not None:
            return self.rtc_ticket_secret.get_secret_value().encode()
        seed = self.openai_webhook_secret or self.openai_api_key
        if seed is None:
            raise SettingsError("SIDEBAND_RTC_TICKET_SECRET is required")
        return hmac.new(seed.get_secret_value().encode(), b"sideband rtc ticket", hashlib.sha256).digest()


def _host_and_port(netloc: str) -> None:
    """Refuse a URL's ``host[:port]`` that no connection could be opened to (a :class:`ValueError`)."""
    if netloc.startswith("["):  # an IPv6 literal: [::1], [::1]:8080
        literal, _, port = netloc[1:].partition("]")
        try:
            ipaddress.IPv6Address(literal)
        except ValueError:
            raise ValueError("must name a host ([…] holds no IPv6 address)") from None
        if port and not port.startswith(":"):
            raise ValueError("must name a host ([IPv6 address] then at most :port)")
        port = port[1:]
    else:
        host, _, port = netloc.partition(":")
        if not host:
            raise ValueError("must name a host (scheme://host/…)")
        try:
            host.encode("idna")
        except UnicodeError:  # (an empty label, one over 63 characters: bad..host)
            raise ValueError("must name a host (not a valid host name)") from None
    if port and (not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535):
        raise ValueError("must have a port from 1 to 65535 after the host, if any")


def _alias(field: Any) -> str:
    alias = field.validation_alias
    return str(alias.choices[0]) if isinstance(alias, AliasChoices) else str(alias)


_NAMES: dict[str, str] = {name: _alias(f) for name, f in Settings.model_fields.items()}


_FIELDS: dict[str, str] = {n.lower(): field for field, name in _NAMES.items() for n in (field, name)}
"""Field and variable names, in lower case (pydantic-settings takes either in any case) → the field."""


def _unknown(key: str, *, variable: bool = False) -> str:
    """The error for an override that names no setting, with the closest field names; for an
    environment variable (``variable``), with the closest variable's name."""
    if variable:
        # (compared without the prefix they share, which would make any two look alike; a field's name
        # as a variable is a slip too: SIDEBAND_MAX_IDLE_DURATION → SIDEBAND_MAX_IDLE_SECONDS)
        names = {n.removeprefix("SIDEBAND_"): n for n in _NAMES.values()}
        by_other = {f.upper(): n for f, n in _NAMES.items()}
        word, most = key.removeprefix("SIDEBAND_").upper(), 1
    else:
        # (a variable's name without its prefix is the usual slip: SIDEBAND_MAX_IDLE_SECONDS →
        # max_idle_seconds)
        names = {f: f for f in _NAMES}
        by_other = {n.removeprefix("SIDEBAND_").removeprefix("OPENAI_").lower(): f for f, n in _NAMES.items()}
        word, most = key.lower(), 3
    near = [by_other[word]] if word in by_other else []
    near += [
        names[n] for n in difflib.get_close_matches(word, names, n=3, cutoff=0.6) if names[n] not in near
    ]
    hint = f" (did you mean {' or '.join(near[:most])}?)" if near else ""
    return f"{key}: not a setting{hint}"


_VARIABLES = frozenset(_NAMES.values())

_SERVICE_LINK = re.compile(
    r"SIDEBAND(?:_[A-Z0-9_]+)?_"
    r"(?:SERVICE_HOST|SERVICE_PORT(?:_[A-Z0-9_]+)?|PORT_\d+_(?:TCP|UDP|SCTP)(?:_PROTO|_PORT|_ADDR)?)"
)
"""What Kubernetes sets for each service of the namespace (``sideband-redis``:
``SIDEBAND_REDIS_SERVICE_HOST``, ``SIDEBAND_REDIS_PORT_6379_TCP``…), besides ``…_PORT=tcp://…``: no
misspelt setting."""


def _unknown_variable(environ: Mapping[str, str]) -> str | None:
    """The error for the first ``SIDEBAND_`` variable of ``environ`` that names no setting (a misspelt one
    would leave the default in place, silently), or ``None``."""
    for name in sorted(environ):
        if not name.startswith("SIDEBAND_") or name in _VARIABLES or _SERVICE_LINK.fullmatch(name):
            continue
        if name.endswith("_PORT") and environ[name].startswith(("tcp://", "udp://", "sctp://")):
            continue  # (a service's link, too)
        return _unknown(name, variable=True)
    return None


def env_name(field: str) -> str:
    """The environment variable behind a settings field."""
    return str(_NAMES.get(field, field))


class _ExplicitSettings(Settings):
    """Settings from explicit values only (no process environment): tests and embedding."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (_Given(init_settings),)


def load_settings(
    overrides: Mapping[str, Any] | None = None,
    *,
    require: Iterable[str] = (),
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, str] | None = None,
) -> Settings:
    """Build settings from the environment plus ``overrides`` (field names, e.g. from CLI flags).

    ``require`` names fields that must be set for the command at hand; ``flags`` the command-line option
    each override came from (``{"port": "--port"}``). An override wins over the environment by either of
    its names (``port``, ``SIDEBAND_PORT``); a blank one (``""``, whitespace; ``host`` aside) is none, and
    the variable, else the default, applies, from ``environ`` as from the process environment.

    Raises :class:`SettingsError` with a one-line message naming the variable, or the option when the bad
    value came from one; a ``SIDEBAND_`` variable of the environment (``environ`` when given) that names
    no setting is refused too, with the closest names (Kubernetes' service links aside:
    ``SIDEBAND_REDIS_SERVICE_HOST``…).
    """
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = [k for k in given if k.lower() not in _FIELDS]
    if unknown:  # a misspelt override would otherwise leave the default in place, silently
        raise SettingsError(_unknown(unknown[0]))
    # By field name, whichever name it was given by (``SIDEBAND_PORT``, ``port``); a blank one is no
    # override (``--port "$PORT"``, PORT unset): the variable, else the default, applies.
    values = {
        _FIELDS[k.lower()]: v
        for k, v in given.items()
        if _NAMES[_FIELDS[k.lower()]] in _BLANK_IS_A_VALUE or not (isinstance(v, str) and not v.strip())
    }
    source = os.environ if environ is None else environ
    misspelt = _unknown_variable(source)
    if misspelt is not None:
        raise SettingsError(misspelt)
    if "port" not in values and source.get("SIDEBAND_PORT", "").startswith(("tcp://", "udp://")):
        raise SettingsError(
            f"SIDEBAND_PORT: {source['SIDEBAND_PORT']!r} is Kubernetes' link to a Service named sideband, "
            "not a port: set SIDEBAND_PORT in the pod spec, or enableServiceLinks: false"
        )
    try:
        if environ is None:
            settings: Settings = Settings(**values)
        else:
            env = {field: environ[name] for field, name in _NAMES.items() if name in environ}
            settings = _ExplicitSettings(**{**env, **values})
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = str(err["loc"][0]) if err["loc"] else "settings"
        name = loc if loc.isupper() else env_name(loc)
        field = next((f for f, n in _NAMES.items() if name in (n, f)), loc)
        if flags and field in flags and field in values:
            name = flags[field]
        raise SettingsError(f"{name}: {err['msg']}") from None
    for field in require:
        value = getattr(settings, field)
        if value is None or (isinstance(value, SecretStr) and not value.get_secret_value()):
            raise SettingsError(f"{env_name(field)} is not set")
    return settings
