"""Optional dependencies of the broker: a missing one is an error naming the extra to install."""

from __future__ import annotations

from typing import Any

from .exceptions import ConfigurationError

# Broker URL scheme -> the extra that installs what kombu's transport for it imports.
# RabbitMQ (amqp://) needs none: kombu depends on py-amqp itself.
BROKER_EXTRAS = {"redis": "redis", "rediss": "redis", "sentinel": "redis"}


def check_broker_transport(broker_url: Any) -> None:
    """A broker of one of sagaline's extras whose kombu transport cannot be imported is
    refused here, naming the extra to install, instead of failing later, deep in kombu,
    when a worker or client connects."""
    from kombu.transport import resolve_transport

    first = broker_url[0] if isinstance(broker_url, (list, tuple)) else broker_url
    if not isinstance(first, str) or "://" not in first:
        return
    # Failover lists ("a://;b://") and "redis+socket://" name the transport first.
    scheme = first.split(";", 1)[0].split("://", 1)[0].split("+", 1)[0].lower()
    extra = BROKER_EXTRAS.get(scheme)
    if extra is None:
        # Not a broker sagaline has an extra for: Celery reports a missing client itself.
        return
    try:
        resolve_transport(scheme)
    except ImportError as exc:
        raise ConfigurationError(
            f"the {scheme}:// broker needs {exc.name or str(exc)!r}, which is not installed: "
            f"pip install 'sagaline[{extra}]'"
        ) from None
