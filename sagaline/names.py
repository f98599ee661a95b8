"""The names of sagas and steps: what a name may be, and a step's default name."""

from __future__ import annotations

from typing import Any

from .exceptions import DefinitionError
from .payload import MAX_NAME_LENGTH, RESERVED_KEYS, check_text
from .steps import TaskRef, task_name


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


def default_step_name(task: TaskRef) -> str:
    return short_name(task_name(task))


def short_name(dotted: str) -> str:
    """`shop.tasks.charge_payment` -> `charge_payment`."""
    return dotted.rsplit(".", 1)[-1]
