"""Every sagaline setting, declared once: type, default, environment variable."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, fields
from datetime import timedelta
from pathlib import Path
from typing import Any

from .exceptions import ConfigurationError
from .payload import DEFAULT_MAX_BYTES


def default_home() -> Path:
    return Path(os.environ.get("SAGALINE_HOME") or Path.home() / ".sagaline")


# A file a worker touches once it consumes (Celery's `worker_ready`): launchers such as
# `sagaline.testing.WorkerProcess` and `sagaline demo` set it and wait for the file.
READY_FILE_ENV = "SAGALINE_READY_FILE"


def ready_file() -> Path | None:
    path = os.environ.get(READY_FILE_ENV)
    return Path(path) if path else None


TRACING_CHOICES = ("off", "otlp")
LOG_FORMATS = ("plain", "json")


@dataclass(frozen=True)
class Settings:
    """Settings of one process. Each field reads `SAGALINE_<NAME>` when not passed."""

    # Where saga state lives: sqlite:///path, postgresql+psycopg://..., mysql+pymysql://...,
    # redis://..., memory://. Default: a SQLite file in SAGALINE_HOME.
    store_url: str = ""
    # A RUNNING step's claim lasts this long unless its worker renews it (every lease/3).
    lease: float = 60.0
    # A DISPATCHED step not claimed within this many seconds is published again.
    redispatch_after: float = 30.0
    # A step whose worker died is re-run this many extra times before it counts as failed.
    crash_retries: int = 3
    # A step whose task the receiving worker has not registered is published again
    # (another worker may have it) this many times, then fails.
    unknown_task_redispatches: int = 3
    # How often the sweeper in each worker looks for stalled work.
    sweep_interval: float = 5.0
    # Run the sweeper inside every `celery worker` of an app with sagaline.
    sweeper: bool = True
    # Apply schema migrations on first use.
    auto_migrate: bool = True
    # Store SQL statements log (SQLAlchemy echo), for debugging.
    echo_sql: bool = False
    # The largest JSON document a saga accepts, in bytes: its input, each step output,
    # compensation data, and the context a step receives (see payload.py). Brokers
    # and stores have limits of their own (SQS 256 KiB, RabbitMQ 16 MiB by default,
    # MariaDB's max_allowed_packet 16 MiB): the final context, the union of every
    # output, must fit there too.
    max_payload_bytes: int = DEFAULT_MAX_BYTES
    # OpenTelemetry traces (the `otel` extra): "otlp" traces every saga, through the
    # application's TracerProvider if it set one, else through an OTLP/HTTP exporter
    # configured by the standard OTEL_* variables; "off" traces nothing.
    # `init_app(app, tracing=True)` is "otlp".
    tracing: str = "off"
    # "json": the worker logs one JSON object per line, with the saga, step and trace
    # of the record (observability/logs.py); "plain": Celery's format.
    log_format: str = "plain"
    # Serve Prometheus metrics on this port from every worker (0: off). Needs the
    # `prometheus` extra.
    metrics_port: int = 0
    # The file a worker touches every heartbeat_interval seconds, which
    # `sagaline health --liveness` reads (default: $SAGALINE_HOME/worker.heartbeat).
    heartbeat_file: str = ""
    heartbeat_interval: float = 10.0
    # Where the outbox's events go (sagaline/outbox/): whitespace-separated
    # `topic-pattern=url` routes, first match wins, e.g.
    # "order.*=amqp://guest:guest@localhost//?exchange=orders *=redis://localhost/0".
    # When set, workers run the relay and send a step's events right after its commit.
    outbox_routes: str = ""
    # Run the outbox relay inside every `celery worker` (when outbox_routes is set).
    outbox_relay: bool = True
    # Retention: the sweeper deletes sagas that ended COMPLETED or COMPENSATED this
    # long ago, with their steps and history (0: keep them forever). A duration:
    # seconds, or 30d, 12h, 45m, 2w (SAGALINE_RETENTION=30d).
    retention: float = 0.0

    @classmethod
    def from_env(cls, **overrides: Any) -> Settings:
        values: dict[str, Any] = {}
        for f in fields(cls):
            if overrides.get(f.name) is not None:
                values[f.name] = overrides[f.name]
                continue
            raw = os.environ.get(f"SAGALINE_{f.name.upper()}")
            if raw is None or raw == "":
                continue
            values[f.name] = _parse(f.name, f.type, raw)
        if isinstance(values.get("retention"), (str, timedelta)):
            try:
                values["retention"] = parse_duration(values["retention"])
            except ValueError as exc:
                raise ConfigurationError(f"retention: {exc}") from None
        if isinstance(values.get("tracing"), bool):
            values["tracing"] = "otlp" if values["tracing"] else "off"
        if not values.get("store_url"):
            values["store_url"] = default_store_url()
        settings = cls(**values)
        if settings.lease <= 0 or settings.redispatch_after <= 0 or settings.sweep_interval <= 0:
            raise ConfigurationError("lease, redispatch_after and sweep_interval must be > 0")
        if settings.retention < 0:
            raise ConfigurationError(f"retention must be >= 0, got {settings.retention!r}")
        if settings.heartbeat_interval <= 0:
            raise ConfigurationError("heartbeat_interval must be > 0")
        if settings.max_payload_bytes < 1024:
            raise ConfigurationError("max_payload_bytes must be at least 1024")
        if settings.tracing not in TRACING_CHOICES:
            raise ConfigurationError(
                f"tracing must be one of {', '.join(TRACING_CHOICES)}, "
                f"got {settings.tracing!r} (SAGALINE_TRACING)"
            )
        if settings.log_format not in LOG_FORMATS:
            raise ConfigurationError(
                f"log_format must be one of {', '.join(LOG_FORMATS)}, "
                f"got {settings.log_format!r} (SAGALINE_LOG_FORMAT)"
            )
        return settings


def _parse(name: str, type_: Any, raw: str) -> Any:
    kind = type_ if isinstance(type_, str) else getattr(type_, "__name__", str(type_))
    if name in DURATIONS:
        kind = "duration (3600, 45m, 12h, 30d, 2w)"
    try:
        if kind == "bool":
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if name in DURATIONS:
            return parse_duration(raw)
        if kind == "float":
            return float(raw)
        if kind == "int":
            return int(raw)
        return raw
    except ValueError:
        raise ConfigurationError(f"SAGALINE_{name.upper()}={raw!r} is not a valid {kind}") from None


# Settings that take a duration with a unit (parse_duration), not only seconds.
DURATIONS = frozenset({"retention"})
# The one grammar of a duration's text (settings, `gc --older-than`, relative times such
# as `ls --since 2h`, the testkit's clock): a number of seconds, or numbers with units,
# in any case, spaces allowed: 90s, 45m, 12h, 2h30m, 250ms, 59min, 30d, 2w.
DURATION_UNITS = {
    "": 1.0,  # a bare number
    "ms": 0.001,
    "s": 1.0,
    "sec": 1.0,
    "m": 60.0,
    "min": 60.0,
    "h": 3600.0,
    "d": 86400.0,
    "w": 604800.0,
}
_NUMBER, _UNIT = r"\d+(?:\.\d+)?", "ms|sec|min|s|m|h|d|w"  # a unit before its prefixes
DURATION = re.compile(rf"\s*(?:{_NUMBER}|(?:{_NUMBER}\s*(?:{_UNIT})\s*)+)\s*", re.IGNORECASE)
DURATION_PART = re.compile(rf"({_NUMBER})\s*({_UNIT})", re.IGNORECASE)


def duration_seconds(text: str, *, unit_needed: bool = False) -> float | None:
    """Seconds in a duration's text (DURATION); None when it is not one, or when it is a
    bare number and `unit_needed`."""
    if DURATION.fullmatch(text) is None:
        return None
    parts = DURATION_PART.findall(text)
    if not parts:
        return None if unit_needed else float(text)
    return sum(float(n) * DURATION_UNITS[unit.lower()] for n, unit in parts)


def parse_duration(value: str | float | timedelta) -> float:
    """Seconds in a duration: a number of seconds, a timedelta, or text as 30s, 10m, 2h,
    2h30m, 30d, 1w."""
    if isinstance(value, timedelta):
        seconds: float | None = value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        seconds = duration_seconds(str(value))
    if seconds is None or not 0 <= seconds < float("inf"):
        raise ValueError(f"{value!r} is not a duration like 3600, 45m, 12h, 30d or 2w")
    return seconds


def default_store_url() -> str:
    return f"sqlite:///{default_home() / 'state.db'}"


def default_broker_url() -> str:
    """The server-less broker: kombu's filesystem transport, made atomic (broker.py)."""
    from . import broker

    broker.register()
    return f"{broker.SCHEME}://"


def default_broker_options() -> dict[str, Any]:
    queue_dir = default_home() / "broker"
    (queue_dir / "processed").mkdir(parents=True, exist_ok=True)
    return {
        "data_folder_in": str(queue_dir),
        "data_folder_out": str(queue_dir),
        "processed_folder": str(queue_dir / "processed"),
        # Broadcasts (celery inspect/control) go here too, not into the working directory.
        "control_folder": str(queue_dir / "control"),
        "store_processed": False,
        # kombu polls the folder; its 1 s default would add a second to every step.
        "polling_interval": 0.05,
    }
