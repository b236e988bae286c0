"""Settings, read once from the environment at the edges (CLI, Celery app, migrations).

Everything else receives a :class:`Settings` or the values it needs. Tests build one from a
plain dict with :meth:`Settings.from_env`, so nothing patches ``os.environ``.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import pydantic
import sqlalchemy as sa
from pydantic import AfterValidator, BeforeValidator, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from worker import crypto, errors

__all__ = [
    "BROKER_SCHEMES",
    "DEFAULT_BROKER_URL",
    "DEFAULT_DATABASE_URL",
    "DEFAULT_METRICS_PORT",
    "DEFAULT_QUEUE",
    "MAX_DURATION",
    "SECRET_FILES",
    "Duration",
    "Settings",
    "parse_duration",
]

#: Where the SQLite database lives when DATABASE_URL is not set (embedded defaults).
DEFAULT_DATABASE_URL = "sqlite:///session-sync.db"
#: Broker when CELERY_BROKER_URL is not set: kombu's SQLAlchemy transport, no server needed.
DEFAULT_BROKER_URL = "sqla+sqlite:///session-sync-broker.db"
#: The worker's /metrics port: outside 9100-9999 (Prometheus' fully allocated exporter range, where
#: celery-exporter holds 9808) and below Linux's ephemeral ports, so it clashes with no exporter.
DEFAULT_METRICS_PORT = 19808
#: The Celery queue of every task, beat entry and kick: never Celery's default ``celery`` queue, which an
#: app's own workers on the same broker consume.
DEFAULT_QUEUE = "session_sync"
#: Settings that may instead be read from a file named by ``<VARIABLE>_FILE`` (Docker and Kubernetes secrets).
SECRET_FILES = ("PANGEA_AUTHN_TOKEN", "SESSION_SYNC_ENCRYPTION_KEYS")
#: Broker URL schemes kombu knows (``kombu.transport.TRANSPORT_ALIASES``; tests/unit keeps them in step).
#: Listed here so that reading settings in a web process never imports kombu.
BROKER_SCHEMES = frozenset(
    {
        "amqp", "amqps", "pyamqp", "librabbitmq", "confluentkafka", "kafka", "memory", "redis", "rediss",
        "SQS", "sqs", "mongodb", "zookeeper", "sqlalchemy", "sqla", "SLMQ", "slmq", "filesystem", "qpid",
        "sentinel", "consul", "etcd", "azurestoragequeues", "azureservicebus", "pyro", "gcpubsub", "pgmq",
    }
)  # fmt: skip


_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
#: The longest duration any setting takes: far beyond any sensible value, yet ``now + it`` never overflows.
MAX_DURATION = timedelta(days=36500)
_TOO_LONG = "must be at most 36500d (100 years)"


def parse_duration(value: str) -> timedelta:
    """``"30"``/``"30s"``/``"5m"``/``"2h"``/``"1d"``/``"250ms"`` as a duration; ValueError otherwise.

    The one duration syntax of every setting and command-line option.
    """
    parsed = _parse_duration(value)
    if not isinstance(parsed, timedelta):
        raise ValueError(f"{value!r} is not a duration such as 30s, 5m or 2h")
    return parsed


def _parse_duration(value: object) -> object:
    """``"30"``/``"30s"``/``"5m"``/``"2h"``/``"1d"``/``"250ms"`` become seconds; anything else goes to pydantic."""
    if isinstance(value, str) and (match := _DURATION.match(value)):
        try:
            return timedelta(seconds=float(match[1]) * _UNITS[match[2] or "s"])
        except OverflowError:  # pydantic passes only ValueError on as a validation error
            raise ValueError(_TOO_LONG) from None
    return value


def _check_duration(value: timedelta) -> timedelta:
    # pydantic also reads ISO 8601 and "[-]HH:MM:SS", which may be negative.
    if value < timedelta(0):
        raise ValueError("must not be negative")
    if value > MAX_DURATION:
        raise ValueError(_TOO_LONG)
    return value


#: A duration setting: plain seconds or a number with a unit (ms, s, m, h, d); never negative.
Duration = Annotated[timedelta, BeforeValidator(_parse_duration), AfterValidator(_check_duration)]

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*$")


class Settings(BaseSettings):
    """Every setting of session-sync; field aliases are the environment variable names."""

    model_config = SettingsConfigDict(frozen=True, extra="ignore", populate_by_name=True)

    pangea_domain: str | None = Field(None, alias="PANGEA_DOMAIN")
    pangea_base_url: str | None = Field(None, alias="PANGEA_BASE_URL")
    pangea_authn_token: SecretStr | None = Field(None, alias="PANGEA_AUTHN_TOKEN", repr=False)
    database_url: str = Field(DEFAULT_DATABASE_URL, alias="DATABASE_URL")
    celery_broker_url: str = Field(DEFAULT_BROKER_URL, alias="CELERY_BROKER_URL")
    encryption_keys: SecretStr | None = Field(None, alias="SESSION_SYNC_ENCRYPTION_KEYS", repr=False)

    # Tuning knobs.
    check_interval: Duration = Field(timedelta(minutes=5), alias="SESSION_SYNC_CHECK_INTERVAL")
    sweep_period: Duration = Field(timedelta(seconds=15), alias="SESSION_SYNC_SWEEP_PERIOD")
    refresh_margin_floor: Duration = Field(timedelta(minutes=2), alias="SESSION_SYNC_REFRESH_MARGIN")
    refresh_margin_fraction: float = Field(0.1, ge=0, lt=1, allow_inf_nan=False, alias="SESSION_SYNC_REFRESH_FRACTION")
    batch_size: int = Field(500, ge=1, le=10_000, alias="SESSION_SYNC_BATCH_SIZE")
    #: Most ids per bulk list request (and its page size); None: learn Pangea's limit (worker.list_limits).
    bulk_chunk: int | None = Field(None, ge=1, le=10_000, alias="SESSION_SYNC_BULK_CHUNK")
    concurrency: int = Field(32, ge=1, le=1_000, alias="SESSION_SYNC_CONCURRENCY")
    #: How long an active token the worker replaced by a refresh still authenticates (web-app side).
    refresh_grace: Duration = Field(timedelta(minutes=2), alias="SESSION_SYNC_REFRESH_GRACE")
    rate_limit: float = Field(100.0, gt=0, allow_inf_nan=False, alias="SESSION_SYNC_RATE_LIMIT")
    #: Where every worker shares the rate limit's bucket: a ``redis://`` URL, ``database`` (DATABASE_URL's
    #: table ``rate_limit_buckets``), or ``local`` (each process alone). Unset: the broker when it is Redis,
    #: else the database on PostgreSQL, else local (worker.ratelimit.default_store).
    rate_limit_store: str | None = Field(None, alias="SESSION_SYNC_RATE_LIMIT_STORE")
    queue: str = Field(DEFAULT_QUEUE, min_length=1, max_length=200, alias="SESSION_SYNC_QUEUE")
    lease: Duration = Field(timedelta(minutes=2), alias="SESSION_SYNC_LEASE")
    http_timeout: float = Field(10.0, gt=0, le=3600, allow_inf_nan=False, alias="SESSION_SYNC_HTTP_TIMEOUT")
    http_retries: int = Field(3, ge=0, le=10, alias="SESSION_SYNC_HTTP_RETRIES")
    #: First step of the backoff after a session got no answer (doubling, full jitter), and its cap.
    backoff: Duration = Field(timedelta(seconds=5), alias="SESSION_SYNC_BACKOFF")
    backoff_cap: Duration = Field(timedelta(minutes=5), alias="SESSION_SYNC_BACKOFF_CAP")
    revalidation: Literal["auto", "bulk", "per_token"] = Field("auto", alias="SESSION_SYNC_REVALIDATION")
    max_batches_per_sweep: int = Field(200, ge=1, alias="SESSION_SYNC_MAX_BATCHES_PER_SWEEP")
    batches_in_flight: int = Field(4, ge=1, le=64, alias="SESSION_SYNC_BATCHES_IN_FLIGHT")
    guard_share: float = Field(0.2, gt=0, le=1, allow_inf_nan=False, alias="SESSION_SYNC_GUARD_SHARE")
    guard_minimum: int = Field(50, ge=1, alias="SESSION_SYNC_GUARD_MIN")
    max_unverified: Duration = Field(timedelta(hours=1), alias="SESSION_SYNC_MAX_UNVERIFIED")
    stale_policy: Literal["keep", "revoke"] = Field("keep", alias="SESSION_SYNC_STALE_POLICY")
    audit_retention: Duration = Field(timedelta(days=30), alias="SESSION_SYNC_AUDIT_RETENTION")
    # Observability (worker.metrics, worker.logs): the worker's /metrics port (0: off), its address (loopback
    # unless configured), how long a reading of the database gauges is reused, and the log format.
    metrics_port: int = Field(DEFAULT_METRICS_PORT, ge=0, le=65535, alias="SESSION_SYNC_METRICS_PORT")
    metrics_host: str = Field("127.0.0.1", alias="SESSION_SYNC_METRICS_HOST")
    metrics_cache: Duration = Field(timedelta(seconds=15), alias="SESSION_SYNC_METRICS_CACHE")
    log_format: Literal["text", "json"] = Field("text", alias="SESSION_SYNC_LOG_FORMAT")
    # The logout outbox (worker.outbox): delivery period, backoff, dead letters.
    outbox_period: Duration = Field(timedelta(seconds=10), alias="SESSION_SYNC_OUTBOX_PERIOD")
    outbox_batch_size: int = Field(100, ge=1, le=10_000, alias="SESSION_SYNC_OUTBOX_BATCH_SIZE")
    outbox_backoff: Duration = Field(timedelta(seconds=2), alias="SESSION_SYNC_OUTBOX_BACKOFF")
    outbox_backoff_cap: Duration = Field(timedelta(minutes=10), alias="SESSION_SYNC_OUTBOX_BACKOFF_CAP")
    outbox_max_attempts: int = Field(25, ge=1, le=10_000, alias="SESSION_SYNC_OUTBOX_MAX_ATTEMPTS")
    outbox_max_age: Duration = Field(timedelta(days=1), alias="SESSION_SYNC_OUTBOX_MAX_AGE")
    outbox_kick: bool = Field(True, alias="SESSION_SYNC_OUTBOX_KICK")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # from_env hands over the mapping explicitly; nothing is read behind its back.
        return (init_settings,)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Settings from ``env`` (default: ``os.environ``); raises ConfigError naming the variable."""
        env = os.environ if env is None else env
        known = {field.alias for field in cls.model_fields.values() if field.alias}
        values: dict[str, Any] = {k: v for k, v in env.items() if k in known and v != ""}
        for variable in SECRET_FILES:
            if env.get(f"{variable}_FILE"):
                values[variable] = _read_secret_file(variable, env[f"{variable}_FILE"], given=variable in values)
        try:
            return cls(**values)
        except pydantic.ValidationError as exc:
            error = _config_error(exc)
            if error.variable in SECRET_FILES and env.get(f"{error.variable}_FILE"):
                error = errors.ConfigError(f"{error.variable} (from {error.variable}_FILE)", error.problem)
            raise error from None

    @field_validator(
        "check_interval",
        "sweep_period",
        "lease",
        "backoff",
        "backoff_cap",
        "max_unverified",
        "outbox_period",
        "outbox_backoff",
        "outbox_backoff_cap",
        "outbox_max_age",
    )
    @classmethod
    def _check_positive(cls, value: timedelta) -> timedelta:
        if value <= timedelta(0):
            raise ValueError("must be a duration above zero, such as 30s or 5m")
        return value

    @field_validator("pangea_base_url")
    @classmethod
    def _check_base_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        if any(c.isspace() for c in value) or not urlsplit(value).hostname:
            raise ValueError("must be a URL with a host, such as https://authn.aws.us.pangea.cloud")
        try:
            _ = urlsplit(value).port
        except ValueError:
            raise ValueError("has a port that is not a number in 0..65535") from None
        return value.rstrip("/")

    @field_validator("pangea_domain")
    @classmethod
    def _check_domain(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not _HOSTNAME.match(value):
            raise ValueError("must be a bare domain such as aws.us.pangea.cloud (no scheme, no path)")
        return value

    @field_validator("pangea_authn_token")
    @classmethod
    def _check_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        raw = value.get_secret_value()
        if not raw.isascii() or any(c.isspace() for c in raw):
            raise ValueError("must be a single Pangea token with no spaces")
        return value

    @field_validator("encryption_keys")
    @classmethod
    def _check_keys(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        try:
            crypto.parse_keys(value.get_secret_value())
        except errors.ConfigError as exc:  # its message names the key's position, never the key
            raise ValueError(exc.problem) from None
        return value

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str) -> str:
        try:
            backend = sa.make_url(value).get_backend_name()
        except sa.exc.ArgumentError:
            backend = ""
        if backend not in ("sqlite", "postgresql"):
            raise ValueError("must be a sqlite:/// or postgresql:// URL")
        if value.startswith("postgresql://"):
            value = "postgresql+psycopg://" + value.removeprefix("postgresql://")
        return value

    @field_validator("celery_broker_url")
    @classmethod
    def _check_broker_url(cls, value: str) -> str:
        for url in value.split(";"):  # kombu's failover list
            scheme, sep, _ = url.strip().partition("://")
            if not sep or scheme.split("+")[0] not in BROKER_SCHEMES:
                raise ValueError("must be a broker URL such as redis://host:6379/0 or sqla+sqlite:///broker.db")
        return value

    @field_validator("rate_limit_store")
    @classmethod
    def _check_rate_limit_store(cls, value: str | None) -> str | None:
        if value is None or value in ("local", "database") or value.startswith(("redis://", "rediss://")):
            return value
        raise ValueError("must be a redis:// URL (such as redis://127.0.0.1:6379/0), database or local")

    @field_validator("queue")
    @classmethod
    def _check_queue(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.:-]+", value):
            raise ValueError("must be a queue name of letters, digits and _ . : - such as session_sync")
        return value

    @field_validator("metrics_host")
    @classmethod
    def _check_metrics_host(cls, value: str) -> str:
        try:
            ipaddress.ip_address(value)
        except ValueError:
            if not _HOSTNAME.match(value):
                raise ValueError("must be an IP address or a host name, such as 0.0.0.0 or 127.0.0.1") from None
        return value

    @property
    def authn_base_url(self) -> str:
        """Pangea AuthN's base URL: PANGEA_BASE_URL, else ``https://authn.<PANGEA_DOMAIN>``."""
        if self.pangea_base_url:
            return self.pangea_base_url
        if self.pangea_domain:
            return f"https://authn.{self.pangea_domain}"
        raise errors.ConfigError("PANGEA_DOMAIN", "not set (or set PANGEA_BASE_URL)")

    @property
    def authn_token(self) -> str:
        """The AuthN token; raises ConfigError if PANGEA_AUTHN_TOKEN is not set."""
        if self.pangea_authn_token is None:
            raise errors.ConfigError("PANGEA_AUTHN_TOKEN", "not set")
        return self.pangea_authn_token.get_secret_value()

    @property
    def has_service_token(self) -> bool:
        """Whether PANGEA_AUTHN_TOKEN is a service token (``pts_``), which may use ``/v2/session/*``."""
        return self.pangea_authn_token is not None and self.authn_token.startswith("pts_")

    @property
    def capabilities(self) -> dict[str, bool]:
        """What the configured token lets the worker do at Pangea (``session-sync check`` shows it).

        A service token may call every endpoint; a client token only ``/v2/client/*``: per-token
        checks, refreshes and session logouts work, while bulk revalidation, ending a session by its
        id and one-call user-wide logouts do not (a user logout then ends each session we know of).
        """
        service = self.has_service_token
        return {
            "per_token_checks": True,
            "bulk_revalidation": service,
            "user_logout_in_one_call": service,
            "invalidate_by_session_id": service,
        }

    @property
    def bulk_revalidation(self) -> bool:
        """Whether sweeps ask ``/v2/session/list`` in bulk (auto: when the token is a service token)."""
        if self.revalidation == "auto":
            return self.has_service_token
        return self.revalidation == "bulk"

    @property
    def refresh_timeout(self) -> timedelta:
        """The longest one refresh request may be in flight: one attempt, three HTTP timeouts, then abandoned."""
        return timedelta(seconds=self.http_timeout * 3)

    @property
    def refresh_lease(self) -> timedelta:
        """How long a refresh holds its session: taken as the request goes out, it covers the longest
        the request can be in flight (:attr:`refresh_timeout`), plus the ordinary lease as a margin for
        writing the answer and for clocks that disagree, so no other worker takes the row meanwhile."""
        return self.refresh_timeout + self.lease

    @property
    def is_sqlite(self) -> bool:
        """True when the database is SQLite (embedded / development)."""
        return self.database_url.startswith("sqlite")


def _read_secret_file(variable: str, path: str, *, given: bool) -> str:
    """The secret in ``path`` (one trailing newline dropped); a clear ConfigError naming ``<variable>_FILE``."""
    name = f"{variable}_FILE"
    if given:
        raise errors.ConfigError(name, f"set together with {variable}; set only one of them")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise errors.ConfigError(name, f"cannot read {path}: {reason}") from None
    secret = text.removesuffix("\n").removesuffix("\r")
    if not secret.strip():
        raise errors.ConfigError(name, f"{path} is empty")
    return secret


def _config_error(exc: pydantic.ValidationError) -> errors.ConfigError:
    first = exc.errors()[0]
    variable = str(first["loc"][0]) if first["loc"] else "settings"
    message = first["msg"].removeprefix("Value error, ")
    return errors.ConfigError(variable, message)
