"""The transactional outbox: events committed with the change that caused them.

- `sagaline.step_transaction()` (step.py): a step's writes, events and completion
  in one transaction on the saga store's database.
- `publish(connection, topic, payload, key=...)` (events.py): the same for code
  outside sagas, in the caller's own transaction.
- The relay (relay.py, `sagaline relay`) sends committed events to their
  destinations (destinations.py); in a worker it runs as a bootstep, beside
  optimistic sending from the committing process (worker.py). `sagaline.inbox`
  drops duplicates on the way in.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .events import publish

__all__ = ["publish"]


def __getattr__(name: str) -> Any:
    # Imported on first use: events.py needs SQLAlchemy, which a worker whose steps
    # open no step transaction (every worker on the Redis store) never loads.
    if name == "publish":
        from .events import publish

        return publish
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
