"""The names of sagas and steps: what a name may be, and a step's default name; and what
a saga id chosen by the caller may be."""

from __future__ import annotations

from typing import Any

from .exceptions import DefinitionError, InputError
from .payload import KEY, MAX_NAME_LENGTH, RESERVED, RESERVED_KEYS, TYPE, check_text
from .steps import TaskRef, task_name

MAX_SAGA_ID_LENGTH = 36  # the stores' column: a UUID's length
# The paths the REST API serves beside `/sagas/{saga_id}` (web/api.py): a saga with one
# of these ids could never be read over HTTP, so none may be chosen.
RESERVED_SAGA_IDS = frozenset({"counts", "stream"})


def check_saga_name(name: Any) -> None:
    if not isinstance(name, str):
        raise DefinitionError(f"a saga name is a string, got {type(name).__name__}")
    check_text(name, "saga name", limit=MAX_NAME_LENGTH, error=DefinitionError)


def check_step_name(saga: str, name: Any) -> None:
    if not isinstance(name, str):
        raise DefinitionError(f"a step name is a string, got {type(name).__name__}", saga=saga)
    check_text(name, "step name", limit=MAX_NAME_LENGTH, error=DefinitionError, saga=saga)
    if name in RESERVED_KEYS:
        # A non-dict output is stored in the context under the step's name.
        raise DefinitionError(
            f"{name!r} is a reserved context key; name the step otherwise", saga=saga, step=name
        )


def check_saga_id(saga_id: Any) -> None:
    """A saga id the caller chose (sagaline's own are UUIDs): one that every store keeps
    and the REST API can address as `/api/v1/sagas/{saga_id}`."""
    if not isinstance(saga_id, str):
        raise InputError(
            f"saga_id must be a string, got {type(saga_id).__name__}", rule=TYPE, where="saga_id"
        )
    check_text(saga_id, "saga_id", limit=MAX_SAGA_ID_LENGTH, rule=KEY, where="saga_id")
    if "/" in saga_id or saga_id in RESERVED_SAGA_IDS:
        raise InputError(
            f"saga_id {saga_id!r} is reserved: the REST API could not address it (a saga id "
            f"has no '/' and is none of {', '.join(sorted(RESERVED_SAGA_IDS))})",
            rule=RESERVED,
            where="saga_id",
        )


def default_step_name(task: TaskRef) -> str:
    return short_name(task_name(task))


def short_name(dotted: str) -> str:
    """`shop.tasks.charge_payment` -> `charge_payment`."""
    return dotted.rsplit(".", 1)[-1]
