"""Lifecycle signals that metrics, tracing and user code subscribe to.

They are Celery signals (`celery.utils.dispatch.Signal`): connect with
`@saga_finished.connect`. They fire after the store committed the transition,
in the process that caused it.
"""

from __future__ import annotations

from celery.utils.dispatch import Signal

saga_started = Signal(name="sagaline.saga_started", providing_args={"saga_id", "name"})
saga_finished = Signal(
    name="sagaline.saga_finished", providing_args={"saga_id", "name", "status", "duration"}
)
# queue_wait: seconds from the step's dispatch (a retry: the end of its backoff) to
# this claim; None when the message does not say when it was dispatched.
step_started = Signal(
    name="sagaline.step_started",
    providing_args={"saga_id", "name", "step", "phase", "attempt", "queue_wait"},
)
step_finished = Signal(
    name="sagaline.step_finished",
    providing_args={"saga_id", "name", "step", "phase", "attempt", "outcome", "duration"},
)
# After a sweeper pass, and after a worker handed back the claims of its dead pool
# processes: `counts` maps a kind (a sweeper.RepairKind value, or "worker_lost") to
# how many items were repaired.
sweeper_repaired = Signal(name="sagaline.sweeper_repaired", providing_args={"counts"})
# After retention deleted finished sagas (the sweeper's pass with SAGALINE_RETENTION, or
# `sagaline.gc`): `by_status` maps a saga status to how many sagas of it were deleted,
# `steps` and `events` count what went with them.
retention_deleted = Signal(
    name="sagaline.retention_deleted", providing_args={"by_status", "steps", "events"}
)
