"""sagaline: sagas on Celery, with durable state, automatic compensation and crash recovery."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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
    from .ops import SagaView, cancel, gc, get_saga, list_sagas, migrate, resume, sweep
    from .outbox.consumers import start_on
    from .outbox.step import StepTransaction, step_transaction
    from .states import CompensationStatus, FailureStrategy, Phase, SagaStatus, StepStatus
    from .steps import FAIL_FAST_WITH_GRACE, Retry, Step, StepResponse, saga_step

# Each public name and the module that defines it, imported on first use (PEP 562):
# `import sagaline` stays cheap for whoever needs only a part of it (the pytest
# plugin is loaded by every pytest run of a project that installs sagaline[testing]).
_EXPORTS = {
    "init_app": "celery_app",
    "Settings": "config",
    "StepInfo": "context",
    "current_step": "context",
    "Saga": "definition",
    "ConcurrencyError": "exceptions",
    "ConfigurationError": "exceptions",
    "DefinitionError": "exceptions",
    "IdempotencyConflict": "exceptions",
    "InputError": "exceptions",
    "InvalidTransition": "exceptions",
    "SagaCompensated": "exceptions",
    "SagaError": "exceptions",
    "SagaFailed": "exceptions",
    "SagaNotFound": "exceptions",
    "SagaOutcomeError": "exceptions",
    "SagaTimeout": "exceptions",
    "StepFailure": "exceptions",
    "StoreError": "exceptions",
    "parallelize": "functional",
    "saga": "functional",
    "step": "functional",
    "transform": "functional",
    "SagaHandle": "handle",
    "SagaView": "ops",
    "cancel": "ops",
    "gc": "ops",
    "get_saga": "ops",
    "list_sagas": "ops",
    "migrate": "ops",
    "resume": "ops",
    "sweep": "ops",
    "CompensationStatus": "states",
    "FailureStrategy": "states",
    "Phase": "states",
    "SagaStatus": "states",
    "StepStatus": "states",
    "FAIL_FAST_WITH_GRACE": "steps",
    "Retry": "steps",
    "Step": "steps",
    "StepResponse": "steps",
    "saga_step": "steps",
    "StepTransaction": "outbox.step",
    "step_transaction": "outbox.step",
    "start_on": "outbox.consumers",
}
# Submodules reachable as attributes: `sagaline.outbox.publish`, `sagaline.inbox.receive`.
_SUBMODULES = {"inbox", "outbox"}


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


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
    "gc",
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
