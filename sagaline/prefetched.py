"""Step messages a killed worker held, put back in their queues (Redis broker).

A worker acknowledges a saga step's message once the step ended (acking.py), so a
worker killed with -9 leaves unacknowledged the messages of the steps it was
running and those it had received but not started (`worker_prefetch_multiplier` x
concurrency more). On RabbitMQ the broker delivers them again as soon as the
connection drops. kombu's Redis transport keeps them in its `unacked` hash and
delivers them again only after `visibility_timeout` (one hour by default);
sagaline's sweeper would publish them again after `redispatch_after`, and not at
all a message whose step was claimed but never completed.

A starting worker does better: the saga step messages that were delivered before it
started and are still unacknowledged are either held by a worker that died, or by
a live one. It puts them back at the head of their queues, with kombu's own
restore. A live worker's copy then runs at most once with the restored one: the
claim (a compare-and-set on the step's attempt) refuses the second.
Messages that are not saga steps are left alone: only their own worker knows them.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from .runtime import HEADER

log = logging.getLogger("sagaline")

# Entries looked at per start; a larger backlog of unacknowledged messages is left
# to kombu's visibility timeout and the sweeper.
SCAN_LIMIT = 10_000


def requeue_prefetched_steps(app: Any, delivered_before: float) -> int:
    """Put back the unacknowledged saga step messages delivered before `delivered_before`.

    Only on a Redis broker; returns how many messages were put back.
    """
    with app.connection_for_write() as conn:
        if conn.transport.driver_type != "redis":
            return 0
        channel = conn.default_channel
        qos = channel.qos
        client = channel.client
        # Oldest first, delivered before this worker started.
        tags = client.zrange(
            qos.unacked_index_key,
            "-inf",
            f"({delivered_before}",
            byscore=True,
            offset=0,
            num=SCAN_LIMIT,
        )
        restored = 0
        for tag in tags:
            raw = client.hget(qos.unacked_key, tag)
            if raw is None or not _is_step_message(raw):
                continue
            qos.restore_by_tag(tag, client)
            restored += 1
        if restored:
            log.warning(
                "put back %s saga step message(s) that a worker had received but "
                "not started before this worker started",
                restored,
            )
        return restored


def _is_step_message(raw: bytes | str) -> bool:
    try:
        message, _exchange, _routing_key = json.loads(raw)
        return bool((message.get("headers") or {}).get(HEADER))
    except (ValueError, TypeError, AttributeError):
        return False
