"""sagaline: sagas on Celery, with durable state, automatic compensation and crash recovery."""

from __future__ import annotations

from . import inbox, outbox
from .celery_app import init_app
from .config import Settings
from .context import StepInfo, current_step
from .definition import Saga
from .exceptions import (
    ConcurrencyError,
    ConfigurationError,
    DefinitionError,
    IdempotencyConflict,
    InputError,
    InvalidTransition,
    SagaCompensated,
    SagaError,
    SagaFailed,
    SagaNotFound,
    SagaOutcomeError,
    SagaTimeout,
    StepFailure,
    StoreError,
)
from .functional import parallelize, saga, step, transform
from .handle import SagaHandle
from .ops import SagaView, cancel, get_saga, list_sagas, migrate, resume, sweep
from .outbox.consumers import start_on
from .outbox.step import StepTransaction, step_transaction
from .states import CompensationStatus, FailureStrategy, Phase, SagaStatus, StepStatus
from .steps import FAIL_FAST_WITH_GRACE, Retry, Step, StepResponse, saga_step

__version__ = "0.1.0"

__all__ = [
    # defining sagas
    "FAIL_FAST_WITH_GRACE",
    "FailureStrategy",
    "Retry",
    "Saga",
    "Step",
    "StepResponse",
    "parallelize",
    "saga",
    "saga_step",
    "step",
    "transform",
    # running them
    "SagaHandle",
    "Settings",
    "StepInfo",
    "current_step",
    "init_app",
    # exactly-once database effects, events in and out
    "StepTransaction",
    "inbox",
    "outbox",
    "start_on",
    "step_transaction",
    # operating them
    "SagaView",
    "cancel",
    "get_saga",
    "list_sagas",
    "migrate",
    "resume",
    "sweep",
    # statuses
    "CompensationStatus",
    "Phase",
    "SagaStatus",
    "StepStatus",
    # errors
    "ConcurrencyError",
    "ConfigurationError",
    "DefinitionError",
    "IdempotencyConflict",
    "InputError",
    "InvalidTransition",
    "SagaCompensated",
    "SagaError",
    "SagaFailed",
    "SagaNotFound",
    "SagaOutcomeError",
    "SagaTimeout",
    "StepFailure",
    "StoreError",
]
