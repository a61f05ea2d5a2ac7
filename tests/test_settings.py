"""Tests for sideband.settings: env names, validation messages, overrides, derived values."""

import hashlib
import hmac
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sideband.settings import Settings, SettingsError, env_name, load_settings

REPO = Path(__file__).resolve().parents[1]
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


Env = dict[str, str]
Overrides = dict[str, object]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run every test without the real OPENAI_*/SIDEBAND_* variables."""
    for name in list(os.environ):
        if name.startswith(("OPENAI_", "SIDEBAND_")):
            monkeypatch.delenv(name)


def load(env: Env | None = None, overrides: Overrides | None = None, **kw: object) -> Settings:
    """load_settings with an explicit environment (never the real one)."""
    return load_settings(overrides, environ=env or {}, **kw)  # type: ignore[arg-type]


def error_for(env: Env | None = None, overrides: Overrides | None = None, **kw: object) -> str:
    with pytest.raises(SettingsError) as info:
        load(env, overrides, **kw)
    message = str(info.value)
    assert "\n" not in message and "\r" not in message, message
    return message


# -- env names map to fields ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "raw", "field", "expected"),
    [
        (
            "OPENAI_BASE_URL",
            "https://proxy.example.com/v1",
            "openai_base_url",
            "https://proxy.example.com/v1",
        ),
        ("SIDEBAND_HOST", "127.0.0.1", "host", "127.0.0.1"),
        ("SIDEBAND_HOST", "", "host", ""),  # (blank: both address families, not the default)
        ("SIDEBAND_PORT", "9001", "port", 9001),
        ("SIDEBAND_LOG_FORMAT", "json", "log_format", "json"),
        ("SIDEBAND_LOG_FORMAT", "console", "log_format", "console"),
        ("SIDEBAND_LOG_LEVEL", "debug", "log_level", "debug"),
        ("SIDEBAND_LOG_TOOL_ARGUMENTS", "true", "log_tool_arguments", True),
        ("SIDEBAND_LOG_TRANSCRIPTS", "false", "log_transcripts", False),
        ("SIDEBAND_WEBHOOK_MAX_BODY", "1024", "webhook_max_body", 1024),
        ("SIDEBAND_WEBHOOK_TOLERANCE", "60", "webhook_tolerance", 60.0),
        ("SIDEBAND_DEDUP_TTL", str(100 * 3600), "dedup_ttl", 100 * 3600.0),
        ("SIDEBAND_DEDUP_TTL", str(72 * 3600), "dedup_ttl", 72 * 3600.0),
        ("SIDEBAND_ACCEPT_TIMEOUT", "1.5", "accept_attempt_timeout", 1.5),
        ("SIDEBAND_ACCEPT_BUDGET", "3", "accept_budget", 3.0),
        ("SIDEBAND_ROUTE_BUDGET", "0.5", "route_budget", 0.5),
        ("SIDEBAND_ROUTE_FAILURE_STATUS", "503", "route_failure_status", 503),
        ("SIDEBAND_ROUTES_FILE", "/etc/routes.json", "routes_file", Path("/etc/routes.json")),
        ("SIDEBAND_WS_COMPRESSION", "1", "ws_compression", True),
        ("SIDEBAND_REATTACH_ATTEMPTS", "0", "reattach_attempts", 0),
        ("SIDEBAND_MAX_CALL_SECONDS", "60", "max_call_duration", 60.0),
        ("SIDEBAND_MAX_IDLE_SECONDS", "30", "max_idle_duration", 30.0),
        ("SIDEBAND_DRAIN_TIMEOUT", "0", "drain_timeout", 0.0),
        ("SIDEBAND_RTC_KEY_TTL", "60", "rtc_key_ttl", 60),
        (
            "SIDEBAND_VOWEL_CORE_URL",
            "https://core.example.com/",
            "vowel_core_url",
            "https://core.example.com",
        ),
        (
            "SIDEBAND_VOWEL_ENGINE_URL",
            "wss://engine.example.com",
            "vowel_engine_url",
            "wss://engine.example.com",
        ),
        ("SIDEBAND_VOWEL_SERVICE_ID", "svc_1", "vowel_service_id", "svc_1"),
    ],
)
def test_env_variable_maps_to_field(variable: str, raw: str, field: str, expected: object) -> None:
    settings = load({variable: raw})
    assert getattr(settings, field) == expected
    assert env_name(field) == variable


@pytest.mark.parametrize(
    ("variable", "field"),
    [
        ("OPENAI_API_KEY", "openai_api_key"),
        ("OPENAI_WEBHOOK_SECRET", "openai_webhook_secret"),
        ("SIDEBAND_RTC_TICKET_SECRET", "rtc_ticket_secret"),
        ("SIDEBAND_VOWEL_API_KEY", "vowel_api_key"),
    ],
)
def test_secret_env_variables_map_to_secret_fields(variable: str, field: str) -> None:
    settings = load({variable: SECRET})
    value = getattr(settings, field)
    assert value.get_secret_value() == SECRET
    assert SECRET not in repr(settings)  # secrets never show in reprs or logs
    assert env_name(field) == variable


def test_an_api_key_read_from_a_file_loses_its_newline() -> None:
    key = load({"OPENAI_API_KEY": "sk-test\n"}).openai_api_key
    assert key is not None and key.get_secret_value() == "sk-test"


@pytest.mark.parametrize(
    ("variable", "value", "field", "expected"),
    [
        ("SIDEBAND_HOST", " 127.0.0.1\n", "host", "127.0.0.1"),
        ("SIDEBAND_HOST", " ", "host", ""),  # (blank: both address families)
        ("SIDEBAND_LOG_FORMAT", "json\n", "log_format", "json"),
        ("SIDEBAND_ROUTES_FILE", "routes.toml\n", "routes_file", Path("routes.toml")),
        ("SIDEBAND_VOWEL_SERVICE_ID", "order-service\n", "vowel_service_id", "order-service"),
        ("SIDEBAND_PORT", " 8081\n", "port", 8081),
    ],
)
def test_values_lose_their_surrounding_whitespace(
    variable: str, value: str, field: str, expected: Any
) -> None:
    """A value read from a file (a secret mount, a compose file) often ends in a newline."""
    assert getattr(load({variable: value}), field) == expected


def test_defaults() -> None:
    s = load()
    assert s.openai_api_key is None
    assert s.openai_webhook_secret is None
    assert s.openai_base_url == "https://api.openai.com/v1"
    assert s.host == "0.0.0.0"
    assert s.port == 8080
    assert s.log_format is None
    assert s.log_level is None  # each command picks its default
    assert s.log_tool_arguments is False
    assert s.log_transcripts is True
    assert s.webhook_tolerance == 300.0
    assert s.dedup_ttl == 72 * 3600.0
    assert s.route_failure_status == 480
    assert s.routes_file is None
    assert s.sideband_url == "wss://api.openai.com/v1/realtime"


def test_variables_of_other_prefixes_are_ignored() -> None:
    assert load({"PATH": "/bin", "OPENAI_ORG_ID": "org-1", "SIDEBANDX": "1"}).port == 8080


@pytest.mark.parametrize(
    ("variable", "message"),
    [
        (
            "SIDEBAND_LOG_TRANSCRIPT",
            "SIDEBAND_LOG_TRANSCRIPT: not a setting (did you mean SIDEBAND_LOG_TRANSCRIPTS?)",
        ),
        (
            "SIDEBAND_DRAIN_TIMOUT",
            "SIDEBAND_DRAIN_TIMOUT: not a setting (did you mean SIDEBAND_DRAIN_TIMEOUT?)",
        ),
        (
            "SIDEBAND_Drain_Timeout",
            "SIDEBAND_Drain_Timeout: not a setting (did you mean SIDEBAND_DRAIN_TIMEOUT?)",
        ),
        # a field's name as a variable
        (
            "SIDEBAND_MAX_IDLE_DURATION",
            "SIDEBAND_MAX_IDLE_DURATION: not a setting (did you mean SIDEBAND_MAX_IDLE_SECONDS",
        ),
        ("SIDEBAND_OPENAI_API_KEY", "SIDEBAND_OPENAI_API_KEY: not a setting (did you mean OPENAI_API_KEY"),
        ("SIDEBAND_NOT_A_THING", "SIDEBAND_NOT_A_THING: not a setting"),
    ],
)
def test_a_variable_that_names_no_setting_is_refused(
    monkeypatch: pytest.MonkeyPatch, variable: str, message: str
) -> None:
    """A misspelt SIDEBAND_ variable would leave the default in place, silently."""
    assert error_for({variable: "false"}).startswith(message)
    monkeypatch.setenv(variable, "false")
    with pytest.raises(SettingsError) as err:
        load_settings()
    assert str(err.value).startswith(message)


@pytest.mark.parametrize(
    "variable",
    [
        # Kubernetes' links to the services of the namespace (sideband-redis, sideband, sideband-web)
        "SIDEBAND_REDIS_SERVICE_HOST",
        "SIDEBAND_REDIS_SERVICE_PORT",
        "SIDEBAND_REDIS_SERVICE_PORT_REDIS",
        "SIDEBAND_REDIS_PORT",
        "SIDEBAND_REDIS_PORT_6379_TCP",
        "SIDEBAND_REDIS_PORT_6379_TCP_PROTO",
        "SIDEBAND_REDIS_PORT_6379_TCP_PORT",
        "SIDEBAND_REDIS_PORT_6379_TCP_ADDR",
        "SIDEBAND_SERVICE_HOST",
        "SIDEBAND_SERVICE_PORT_HTTP",
        "SIDEBAND_PORT_8080_TCP",
        "SIDEBAND_WEB_PORT_53_UDP_PROTO",
    ],
)
def test_kubernetes_service_links_are_no_misspelt_settings(variable: str) -> None:
    value = "tcp://10.0.0.7:6379" if variable.endswith(("_PORT", "_TCP")) else "6379"
    assert load({variable: value}).port == 8080


def test_a_service_named_sideband_is_named_for_what_it_is() -> None:
    """A Service named ``sideband`` sets ``SIDEBAND_PORT=tcp://…`` in each pod: the error says so, not
    only that an integer was expected; a ``--port`` given wins over it."""
    link = {"SIDEBAND_PORT": "tcp://10.0.0.7:8080"}
    assert error_for(link) == (
        "SIDEBAND_PORT: 'tcp://10.0.0.7:8080' is Kubernetes' link to a Service named sideband, not a port: "
        "set SIDEBAND_PORT in the pod spec, or enableServiceLinks: false"
    )
    assert load(link, overrides={"port": 9000}).port == 9000
    assert load(link, overrides={"SIDEBAND_PORT": "9000"}).port == 9000  # (an override by its variable)
    # a blank --port is no flag (`--port "$PORT"`, PORT unset): the link is still named for what it is
    assert "is Kubernetes' link" in error_for(link, {"port": ""}, flags={"port": "--port"})


def test_a_redis_url_option_no_url_may_set_is_named_quoted_in_one_line() -> None:
    """The URL's option names are percent-decoded: one holding a line break or a terminal's escape is
    shown escaped, so the error stays one line and paints nothing."""
    url = "redis://cache:6379/0?a%0Ab%1b[31mRED=1&decode_responses=false&" + "x" * 50 + "=1"
    message = error_for({"SIDEBAND_REDIS_URL": url})
    assert message.startswith(
        "SIDEBAND_REDIS_URL: Value error, cannot set 'a\\nb\\x1b[31mRED', 'decode_responses', "
        f"'{'x' * 40}'…: the options a URL may set are "
    ), message
    assert "\x1b" not in message


def test_a_redis_urls_tls_options_need_a_rediss_url() -> None:
    """redis-py takes the ``ssl_…`` options on a TLS connection only: on a plain one they are refused
    here, in one line that says why, rather than at start with redis-py's own words."""
    options = "ssl_cert_reqs=required&ssl_ca_certs=/etc/ca.pem"
    assert error_for({"SIDEBAND_REDIS_URL": f"redis://:pw@cache:6379/0?{options}"}) == (
        "SIDEBAND_REDIS_URL: Value error, cannot set ssl_ca_certs, ssl_cert_reqs: the ssl_… options need a "
        "rediss:// URL (TLS)"
    )
    url = load({"SIDEBAND_REDIS_URL": f"rediss://:pw@cache:6379/0?{options}"}).redis_url
    assert url is not None and url.get_secret_value().endswith(options)


def test_a_port_variable_that_is_no_service_link_is_refused() -> None:
    assert error_for({"SIDEBAND_METRICS_PORT": "9090"}).startswith("SIDEBAND_METRICS_PORT: not a setting")


@pytest.mark.parametrize(
    "key", ["MAX_IDLE_DURATION", "sideband_max_idle_seconds", "SIDEBAND_MAX_IDLE_SECONDS"]
)
def test_an_override_in_any_case_is_taken(key: str) -> None:
    """pydantic-settings takes field and variable names in any case: so does the unknown-name check."""
    assert load(overrides={key: 5}).max_idle_duration == 5


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("max_idle_seconds", "max_idle_seconds: not a setting (did you mean max_idle_duration?)"),
        ("api_key", "api_key: not a setting (did you mean openai_api_key"),
        ("max_idle", "max_idle: not a setting (did you mean max_idle_duration?)"),
        ("routes_fle", "routes_fle: not a setting (did you mean routes_file"),
        ("colour", "colour: not a setting"),
    ],
)
def test_an_override_that_names_no_setting_is_refused(key: str, message: str) -> None:
    """A misspelt override (run_app(app, max_idle=5) in a test) would leave the default in place."""
    with pytest.raises(SettingsError) as err:
        load(overrides={key: 5})
    assert str(err.value).startswith(message)
    with pytest.raises(ValueError, match="Extra inputs are not permitted"):
        Settings(**{key: 5})  # type: ignore[arg-type]


def test_reads_process_environment_when_environ_not_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIDEBAND_PORT", "9123")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    s = load_settings()
    assert s.port == 9123
    assert s.openai_api_key is not None
    assert s.openai_api_key.get_secret_value() == "sk-test"


UNPREFIXED = {
    # Field names (any case) and other near misses of the contract's names: never settings.
    "PORT": "18123",
    "HOST": "127.0.0.2",
    "LOG_LEVEL": "INFO",
    "LOG_FORMAT": "xml",
    "DEDUP_TTL": "3600",
    "DRAIN_TIMEOUT": "-1",
    "WEBHOOK_TOLERANCE": "0",
    "ROUTES_FILE": "/nonexistent/routes.json",
    "port": "18124",
    "log_level": "verbose",
    "openai_api_key": "sk-lowercase",
    "sideband_port": "18125",
    "Sideband_Host": "127.0.0.3",
}


def test_unprefixed_process_variables_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in UNPREFIXED.items():
        monkeypatch.setenv(name, value)
    for s in (load_settings(), Settings()):
        assert (s.host, s.port) == ("0.0.0.0", 8080)
        assert s.log_level is None and s.log_format is None
        assert s.dedup_ttl == 72 * 3600.0
        assert s.drain_timeout == 30.0 and s.webhook_tolerance == 300.0
        assert s.routes_file is None
        assert s.openai_api_key is None


def test_unprefixed_variables_do_not_hide_the_documented_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in UNPREFIXED.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("SIDEBAND_PORT", "9123")
    monkeypatch.setenv("SIDEBAND_LOG_LEVEL", "debug")
    s = load_settings()
    assert (s.port, s.log_level) == (9123, "debug")


def test_unprefixed_explicit_environ_is_ignored() -> None:
    s = load(dict(UNPREFIXED))
    assert (s.host, s.port, s.log_level, s.dedup_ttl) == ("0.0.0.0", 8080, None, 72 * 3600.0)


def test_settings_by_field_name_win_over_process_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIDEBAND_PORT", "9000")
    monkeypatch.setenv("SIDEBAND_DRAIN_TIMEOUT", "5")
    s = Settings(port=1234, host="127.0.0.1")
    assert (s.host, s.port) == ("127.0.0.1", 1234)
    assert s.drain_timeout == 5.0  # the documented variable is still read
    by_alias = Settings(SIDEBAND_PORT="4321")
    assert by_alias.port == 4321


def test_explicit_environ_replaces_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-process")
    monkeypatch.setenv("SIDEBAND_PORT", "9000")
    s = load_settings(environ={})
    assert s.openai_api_key is None
    assert s.port == 8080
    with pytest.raises(SettingsError):
        load_settings(environ={}, require=("openai_api_key",))


def test_settings_are_frozen() -> None:
    s = load()
    with pytest.raises(Exception):  # noqa: B017 - pydantic's frozen-instance error
        s.port = 1  # type: ignore[misc]


# -- required ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "variable"),
    [("openai_api_key", "OPENAI_API_KEY"), ("openai_webhook_secret", "OPENAI_WEBHOOK_SECRET")],
)
def test_missing_required_names_the_variable(field: str, variable: str) -> None:
    message = error_for({}, require=(field,))
    assert variable in message
    assert message == f"{variable} is not set"


def test_required_first_missing_is_reported() -> None:
    message = error_for(
        {"OPENAI_WEBHOOK_SECRET": SECRET}, require=("openai_api_key", "openai_webhook_secret")
    )
    assert "OPENAI_API_KEY" in message
    assert "OPENAI_WEBHOOK_SECRET" not in message


@pytest.mark.parametrize("blank", ["", "   ", "\n"])
@pytest.mark.parametrize("variable", ["OPENAI_API_KEY", "OPENAI_WEBHOOK_SECRET"])
def test_empty_required_secret_counts_as_missing(variable: str, blank: str) -> None:
    field = variable.lower()
    message = error_for({variable: blank}, require=(field,))
    assert message == f"{variable} is not set"
    assert load({"OPENAI_API_KEY": " "}).openai_api_key is None  # where the command does not need it


def test_required_present_loads() -> None:
    s = load(
        {"OPENAI_API_KEY": "sk-x", "OPENAI_WEBHOOK_SECRET": SECRET},
        require=("openai_api_key", "openai_webhook_secret"),
    )
    assert s.openai_api_key is not None
    assert s.openai_api_key.get_secret_value() == "sk-x"


# -- malformed values: one line naming the variable -------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "raw"),
    [
        ("SIDEBAND_PORT", "abc"),
        ("SIDEBAND_PORT", "70000"),
        ("SIDEBAND_PORT", "-1"),
        ("SIDEBAND_PORT", "80.5"),
        ("OPENAI_BASE_URL", "api.openai.com/v1"),
        ("OPENAI_BASE_URL", "ftp://api.openai.com"),
        ("SIDEBAND_VOWEL_CORE_URL", "core.example.com"),
        ("OPENAI_BASE_URL", "https://user:s3cret@gateway.example.com/v1"),
        ("SIDEBAND_VOWEL_ENGINE_URL", "wss://token@engine.example.com"),
        ("OPENAI_BASE_URL", "https://api.openai.com:99999/v1"),
        ("OPENAI_BASE_URL", "https://api.openai.com:abc/v1"),
        ("OPENAI_BASE_URL", "https://api.openai.com:0/v1"),
        ("OPENAI_BASE_URL", "https:///v1"),
        ("OPENAI_BASE_URL", "https://:443/v1"),
        ("OPENAI_BASE_URL", "https://api openai.com/v1"),
        ("OPENAI_BASE_URL", "https://api.openai.com/v1\tx"),
        ("OPENAI_BASE_URL", "https://bad..host/v1"),
        ("OPENAI_BASE_URL", "https://[::1]x/v1"),
        ("OPENAI_BASE_URL", "https://api.openai.com/v1?x=1"),
        ("OPENAI_BASE_URL", "https://api.openai.com/v1#x"),
        ("SIDEBAND_VOWEL_CORE_URL", "https://core.example.com:70000"),
        ("SIDEBAND_VOWEL_ENGINE_URL", "wss://engine.example.com?token=x"),
        ("OPENAI_WEBHOOK_SECRET", "whsec_"),
        ("OPENAI_WEBHOOK_SECRET", "whsec_!!!not base64!!!"),
        ("OPENAI_WEBHOOK_SECRET", "whsec_abc$def"),
        ("SIDEBAND_DEDUP_TTL", str(72 * 3600 - 1)),
        ("SIDEBAND_DEDUP_TTL", "3600"),
        ("SIDEBAND_LOG_FORMAT", "xml"),
        ("SIDEBAND_LOG_LEVEL", "verbose"),
        ("SIDEBAND_WEBHOOK_TOLERANCE", "0"),
        ("SIDEBAND_WEBHOOK_TOLERANCE", "inf"),  # a replay outliving its claim would verify again
        ("SIDEBAND_WEBHOOK_TOLERANCE", "3601"),
        ("SIDEBAND_MAX_CALL_SECONDS", "inf"),
        ("SIDEBAND_ACCEPT_BUDGET", "inf"),
        ("SIDEBAND_RTC_TICKET_SECRET", "short"),
        ("SIDEBAND_RTC_TICKET_SECRET", "x" * 31),
        ("SIDEBAND_ROUTE_FAILURE_STATUS", "200"),
        ("SIDEBAND_RTC_KEY_TTL", "7201"),
        ("OPENAI_API_KEY", "sk-one sk-two"),
        ("OPENAI_API_KEY", "sk-one\x01"),  # (every call's accept would fail: a 500 for each webhook)
        ("OPENAI_API_KEY", "sk-ünï"),
        ("SIDEBAND_VOWEL_API_KEY", "vk-one\x7f"),
    ],
)
def test_malformed_value_is_one_line_naming_the_variable(variable: str, raw: str) -> None:
    message = error_for({variable: raw})
    assert message.startswith(f"{variable}:"), message


def test_malformed_secret_is_not_echoed() -> None:
    raw = "whsec_sup3r$ecret-value"
    message = error_for({"OPENAI_WEBHOOK_SECRET": raw})
    assert "OPENAI_WEBHOOK_SECRET" in message
    assert "sup3r" not in message


def test_a_url_with_a_password_is_refused_without_echoing_it() -> None:
    message = error_for({"OPENAI_BASE_URL": "https://user:s3cret@gateway.example.com/v1"})
    assert "user or password" in message and "s3cret" not in message
    assert load({"OPENAI_BASE_URL": "https://gateway.example.com/v1/@team"}).openai_base_url.endswith("@team")
    for odd in ("https://gw.example.com?team=a@b", "https://gw.example.com#a@b"):  # not credentials…
        message = error_for({"OPENAI_BASE_URL": odd})  # …but paths are appended: no query or fragment
        assert "query or fragment" in message and "user or password" not in message, message


def test_settings_built_in_code_do_not_echo_a_malformed_secret_either() -> None:
    with pytest.raises(ValueError) as info:
        Settings(openai_api_key="sk-proj-first sk-proj-second")
    assert "sk-proj" not in str(info.value)


@pytest.mark.parametrize("blank", ["", "   ", "\n"])
def test_a_blank_ticket_secret_is_not_an_empty_key(blank: str) -> None:
    """An unset variable in a manifest (``SIDEBAND_RTC_TICKET_SECRET=${X}``) must not sign tickets with
    b"": the key is derived from the webhook secret as if it were not set."""
    s = load({"SIDEBAND_RTC_TICKET_SECRET": blank, "OPENAI_WEBHOOK_SECRET": SECRET})
    assert s.rtc_ticket_secret is None
    assert s.ticket_key() == hmac.new(SECRET.encode(), b"sideband rtc ticket", hashlib.sha256).digest()


def test_malformed_override_names_the_variable() -> None:
    message = error_for({}, {"port": "not-a-port"})
    assert "SIDEBAND_PORT" in message


def test_a_bad_flag_is_named_as_the_flag_and_a_bad_variable_as_the_variable() -> None:
    flags = {"host": "--host", "port": "--port"}
    assert error_for({}, {"port": 99999}, flags=flags).startswith("--port: ")
    assert error_for({"SIDEBAND_PORT": "70000"}, {"port": None}, flags=flags).startswith("SIDEBAND_PORT: ")


@pytest.mark.parametrize(
    "variable", sorted(env_name(field) for field in Settings.model_fields if field != "host")
)
@pytest.mark.parametrize("blank", ["", "  ", "\n"])
def test_a_blank_variable_is_not_set(variable: str, blank: str) -> None:
    """``SIDEBAND_PORT: ${SIDEBAND_PORT:-}`` in a compose file means the default, not a bad port;
    ``SIDEBAND_ROUTES_FILE=`` no table, not a file named ``.``. Every variable but SIDEBAND_HOST."""
    assert load({variable: blank}) == load({})
    field = next(name for name in Settings.model_fields if env_name(name) == variable)
    assert load({}, {field: blank}) == load({})  # (as a blank override: `--port ""`)


def test_a_blank_variable_falls_back_on_what_is_under_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIDEBAND_PORT", "9000")
    monkeypatch.setenv("SIDEBAND_MAX_CALLS", "")
    s = load_settings({"port": ""})  # `sideband serve --port "$PORT"`, PORT unset: the environment's
    assert (s.port, s.max_calls) == (9000, 0)


def test_a_blank_override_falls_back_on_the_given_environment() -> None:
    """As over the process environment: ``load_settings(…, environ=…)`` with a blank override takes the
    variable's value, not the default."""
    env = {"SIDEBAND_PORT": "9000", "SIDEBAND_MAX_CALLS": "5", "SIDEBAND_HOST": "::"}
    s = load(env, {"port": "", "SIDEBAND_MAX_CALLS": " "})
    assert (s.port, s.max_calls, s.host) == (9000, 5, "::")
    assert load(env, {"host": ""}).host == ""  # (a blank host is a value: both address families)


@pytest.mark.parametrize("key", ["port", "SIDEBAND_PORT", "sideband_port", "PORT", "Port"])
@pytest.mark.parametrize("given", [True, False], ids=["environ", "process"])
def test_an_override_wins_over_the_environment_by_any_of_its_names(
    key: str, given: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SIDEBAND_PORT", "9000")
    environ = {"SIDEBAND_PORT": "9000"} if given else None
    assert load_settings({key: "7000"}, environ=environ).port == 7000
    assert load_settings({key: ""}, environ=environ).port == 9000


def test_valid_whsec_secret_is_kept_and_stripped() -> None:
    s = load({"OPENAI_WEBHOOK_SECRET": f"  {SECRET}\n"})
    assert s.openai_webhook_secret is not None
    assert s.openai_webhook_secret.get_secret_value() == SECRET


@pytest.mark.parametrize(
    "secret",
    [
        "whsec_RdvaYFYUXuIFuEbvZHwMfYFhUf7aMYjYcmM24+Aj40c=",  # padded
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",  # unpadded
    ],
)
def test_whsec_secret_forms_accepted(secret: str) -> None:
    s = load({"OPENAI_WEBHOOK_SECRET": secret})
    assert s.openai_webhook_secret is not None


# -- overrides (CLI flags) -------------------------------------------------------------------------------


def test_overrides_win_over_process_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIDEBAND_PORT", "9000")
    monkeypatch.setenv("SIDEBAND_HOST", "10.0.0.1")
    s = load_settings({"port": 1234, "host": "127.0.0.1"})
    assert (s.host, s.port) == ("127.0.0.1", 1234)


def test_overrides_win_over_explicit_environ() -> None:
    s = load({"SIDEBAND_PORT": "9000", "SIDEBAND_HOST": "10.0.0.1"}, {"port": 1234, "host": "127.0.0.1"})
    assert (s.host, s.port) == ("127.0.0.1", 1234)


def test_none_overrides_leave_env_value() -> None:
    s = load({"SIDEBAND_PORT": "9000"}, {"port": None, "host": None})
    assert s.port == 9000
    assert s.host == "0.0.0.0"


def test_override_without_env() -> None:
    assert load({}, {"port": 4321}).port == 4321


# -- sideband_url and ticket_key -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("base", "expected"),
    [
        ("https://api.openai.com/v1", "wss://api.openai.com/v1/realtime"),
        ("https://api.openai.com/v1/", "wss://api.openai.com/v1/realtime"),
        ("http://127.0.0.1:8765/v1", "ws://127.0.0.1:8765/v1/realtime"),
        ("http://127.0.0.1:8765/v1///", "ws://127.0.0.1:8765/v1/realtime"),
        ("wss://gateway.example.com/v1", "wss://gateway.example.com/v1/realtime"),
        ("ws://localhost/v1/", "ws://localhost/v1/realtime"),
        ("http://[::1]:8080/v1", "ws://[::1]:8080/v1/realtime"),
        ("https://gw.example.com:443/v1", "wss://gw.example.com:443/v1/realtime"),
        ("https://exa_mple.example.com", "wss://exa_mple.example.com/realtime"),
        ("https://bücher.example/v1", "wss://bücher.example/v1/realtime"),
    ],
)
def test_sideband_url(base: str, expected: str) -> None:
    s = load({"OPENAI_BASE_URL": base})
    assert s.sideband_url == expected
    assert not s.openai_base_url.endswith("/")


def test_ticket_key_prefers_explicit_secret() -> None:
    s = load({"SIDEBAND_RTC_TICKET_SECRET": "explicit-" + "x" * 32, "OPENAI_WEBHOOK_SECRET": SECRET})
    assert s.ticket_key() == b"explicit-" + b"x" * 32


def test_ticket_key_derived_from_webhook_secret_is_stable() -> None:
    a = load({"OPENAI_WEBHOOK_SECRET": SECRET, "OPENAI_API_KEY": "sk-a"}).ticket_key()
    b = load({"OPENAI_WEBHOOK_SECRET": SECRET, "OPENAI_API_KEY": "sk-b"}).ticket_key()
    assert a == b  # instances sharing the webhook secret agree
    assert a == hmac.new(SECRET.encode(), b"sideband rtc ticket", hashlib.sha256).digest()
    assert SECRET.encode() not in a


def test_ticket_key_falls_back_to_api_key() -> None:
    a = load({"OPENAI_API_KEY": "sk-a"}).ticket_key()
    b = load({"OPENAI_API_KEY": "sk-b"}).ticket_key()
    assert len(a) == 32
    assert a != b


def test_ticket_key_without_any_secret() -> None:
    with pytest.raises(SettingsError) as info:
        load().ticket_key()
    assert "SIDEBAND_RTC_TICKET_SECRET" in str(info.value)


# -- the CLI surface ---------------------------------------------------------------------------------------


def test_cli_serve_without_api_key_fails_with_one_line() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "SIDEBAND_"))}
    proc = subprocess.run(
        [sys.executable, "-m", "sideband.cli", "serve"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "OPENAI_API_KEY" in lines[0]


@pytest.mark.parametrize(
    "variable",
    [
        "SIDEBAND_DEDUP_TTL",
        "SIDEBAND_ACCEPT_TIMEOUT",
        "SIDEBAND_ACCEPT_BUDGET",
        "SIDEBAND_ROUTE_BUDGET",
        "SIDEBAND_MAX_CALL_SECONDS",
        "SIDEBAND_MAX_IDLE_SECONDS",
        "SIDEBAND_DRAIN_TIMEOUT",
        "SIDEBAND_REATTACH_ATTEMPTS",
        "SIDEBAND_WEBHOOK_MAX_BODY",
    ],
)
def test_an_absurdly_large_value_is_refused_at_start(variable: str) -> None:
    """1e16 seconds would overflow the store's millisecond TTLs and refuse every webhook after a clean
    start: every duration, count and size has a ceiling."""
    with pytest.raises(SettingsError, match=rf"^{variable}: Input should be less than or equal to"):
        load({variable: "10000000000000000"})
