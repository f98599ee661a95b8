"""Lifecycle signals that metrics, tracing and user code subscribe to.

They are Celery signals (`celery.utils.dispatch.Signal`): connect with
`@saga_finished.connect`. They fire after the store committed the transition,
in the process that caused it.
"""

from __future__ import annotations

from celery.utils.dispatch import Signal

saga_started = Signal(name="sagaline.saga_started", providing_args={"saga_id", "name"})
saga_finished = Signal(name="sagaline.saga_finished",
                       providing_args={"saga_id", "name", "status", "duration"})
step_started = Signal(name="sagaline.step_started",
                      providing_args={"saga_id", "name", "step", "phase", "attempt"})
step_finished = Signal(name="sagaline.step_finished",
                       providing_args={"saga_id", "name", "step", "phase", "attempt",
                                       "outcome", "duration"})
