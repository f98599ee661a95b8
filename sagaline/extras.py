"""Optional dependencies of the broker: a missing one is an error naming the extra to install."""

from __future__ import annotations

from typing import Any

from .exceptions import ConfigurationError

# Broker URL scheme -> the extra that installs what kombu's transport for it imports.
# RabbitMQ (amqp://) needs none: kombu depends on py-amqp itself.
BROKER_EXTRAS = {"redis": "redis", "rediss": "redis", "sentinel": "redis"}


def check_broker_transport(broker_url: Any) -> None:
    """A broker whose kombu transport cannot be imported is refused here, naming the extra
    to install, instead of failing later, deep in kombu, when a worker or client connects."""
    from kombu.transport import resolve_transport

    first = broker_url[0] if isinstance(broker_url, (list, tuple)) else broker_url
    if not isinstance(first, str) or "://" not in first:
        return
    # Failover lists ("a://;b://") and "redis+socket://" name the transport first.
    scheme = first.split(";", 1)[0].split("://", 1)[0].split("+", 1)[0].lower()
    try:
        resolve_transport(scheme)
    except KeyError:
        return  # not one of kombu's transports: kombu says so in its own words
    except ImportError as exc:
        extra = BROKER_EXTRAS.get(scheme)
        hint = f"pip install 'sagaline[{extra}]'" if extra else "install what kombu needs"
        raise ConfigurationError(
            f"the {scheme}:// broker needs {exc.name or str(exc)!r}, which is not installed: "
            f"{hint}") from None
