"""The sagaline error tree.

SagaError
├── DefinitionError        a saga definition is invalid (raised at definition time)
├── ConfigurationError     sagaline is not set up, or a setting is wrong
├── InputError             data that a message cannot carry (run() raises it before
│   │                      anything is stored; see payload.py)
│   └── IdempotencyConflict  an idempotency key reused with other input
├── StoreError             the state store failed or is unreachable
│   └── ConcurrencyError   a compare-and-set lost a race too many times
├── SagaNotFound           no saga with that id
├── InvalidTransition      an operation that the saga's status does not allow
├── SagaTimeout            handle.get(timeout=) ran out before the saga ended
└── SagaOutcomeError       the saga ended but did not complete
    ├── SagaCompensated    it failed and every applied step was undone
    └── SagaFailed         it failed and some compensation did not succeed
StepFailure                raised by a step to fail permanently (StepResponse.permanent_failure)
"""

from __future__ import annotations

import traceback
from typing import Any


class SagaError(Exception):
    """Root of every error sagaline raises."""


class DefinitionError(SagaError):
    """A saga definition is invalid; raised when the saga is defined."""

    def __init__(self, message: str, *, saga: str | None = None, step: str | None = None):
        self.detail = message
        self.saga = saga
        self.step = step
        where = []
        if saga:
            where.append(f"saga {saga!r}")
        if step:
            where.append(f"step {step!r}")
        prefix = (", ".join(where) + ": ") if where else ""
        super().__init__(prefix + message)


class ConfigurationError(SagaError):
    """sagaline is not configured, or a setting is invalid."""


class InputError(SagaError, ValueError):
    """Data that a message cannot carry (see `sagaline.payload`), or an invalid run() argument.

    `rule` names the rule it breaks (`depth`, `size`, `key`, `reserved`, ...) and
    `where` the place (`input['a']['b']`), when the payload checker raised it.
    """

    def __init__(self, message: str, *, rule: str | None = None, where: str | None = None):
        self.rule = rule
        self.where = where
        super().__init__(message)

    def __reduce__(self) -> Any:
        # Exceptions cross process boundaries (a prefork pool child, a result backend):
        # keep the fields, which BaseException's default reduce would drop.
        return (type(self), (str(self),), {"rule": self.rule, "where": self.where})


class IdempotencyConflict(InputError):
    """`run(idempotency_key=k)` with input other than that of the saga already holding `k`."""

    def __init__(self, saga_name: str, idempotency_key: str, saga_id: str):
        self.saga_name = saga_name
        self.idempotency_key = idempotency_key
        self.saga_id = saga_id
        super().__init__(
            f"idempotency key {idempotency_key!r} of saga {saga_name!r} already started saga "
            f"{saga_id} with other input; use a new key for new input",
            rule="idempotency",
            where="idempotency_key",
        )

    def __reduce__(self) -> Any:
        return (type(self), (self.saga_name, self.idempotency_key, self.saga_id))


class StoreError(SagaError):
    """The state store failed or could not be reached."""


class ConcurrencyError(StoreError):
    """A compare-and-set lost its race more times than allowed."""


class SagaNotFound(SagaError, LookupError):
    def __init__(self, saga_id: str):
        self.saga_id = saga_id
        super().__init__(f"no saga with id {saga_id!r}")


class InvalidTransition(SagaError):
    def __init__(self, saga_id: str, status: str, action: str):
        self.saga_id = saga_id
        self.status = status
        self.action = action
        super().__init__(f"cannot {action} saga {saga_id!r}: it is {status}")


class SagaTimeout(SagaError, TimeoutError):
    def __init__(self, saga_id: str, timeout: float, status: str):
        self.saga_id = saga_id
        self.status = status
        super().__init__(f"saga {saga_id!r} still {status} after {timeout:g}s")


class SagaOutcomeError(SagaError):
    """The saga ended without completing; `cause` is the error that started the rollback."""

    outcome = "ended"

    def __init__(
        self,
        saga_id: str,
        cause: str | None,
        *,
        step: str | None = None,
        record: Any = None,
        compensation_failures: dict[str, str] | None = None,
    ):
        self.saga_id = saga_id
        self.cause = cause
        self.step = step
        self.record = record
        # Step name -> why its compensation failed for good (a FAILED saga): those
        # steps may still be applied, which the cause alone does not say.
        self.compensation_failures = dict(compensation_failures or {})
        at = f" at step {step!r}" if step else ""
        undone = "".join(
            f"; compensation of {name!r} failed: {why}"
            for name, why in self.compensation_failures.items()
        )
        super().__init__(
            f"saga {saga_id!r} {self.outcome}{at}: {cause or 'no cause recorded'}{undone}"
        )


class SagaCompensated(SagaOutcomeError):
    outcome = "was compensated"


class SagaFailed(SagaOutcomeError):
    outcome = "failed"


class StepFailure(Exception):
    """Raised by a step to fail permanently: no retries, compensation starts at once.

    Built with `StepResponse.permanent_failure(message, compensation_data=...)`.
    When `compensation_data` is given, the failing step's own partial work is
    compensated too.
    """

    _UNSET: Any = object()

    def __init__(self, message: str, *, compensation_data: Any = _UNSET):
        super().__init__(message)
        self.message = message
        self.compensation_data = compensation_data

    @property
    def has_compensation_data(self) -> bool:
        return self.compensation_data is not StepFailure._UNSET


# -- how an error is written into step records and history -----------------------


def describe_error(exc: BaseException) -> str:
    """`Type: message` followed by the traceback, as stored in step records and history."""
    head = f"{type(exc).__name__}: {exc}"
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return head if not exc.__traceback__ else f"{head}\n{tb}"


def first_line(text: str | None) -> str:
    return (text or "").split("\n", 1)[0]
