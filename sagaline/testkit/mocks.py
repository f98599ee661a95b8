"""`mock_step`: replace what a step's (or compensation's) task does, keep everything else."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

_UNSET: Any = object()


class StepMock:
    """Stands in for a task's body in a saga environment; the message, claim and
    completion around it are the real ones. Records the keyword arguments of each call.

    `returns`: the value to return. `raises`: an exception (instance or class) to
    raise. `side_effect`: a callable called with the task's keyword arguments (its
    result is returned), an exception, or an iterable of values and exceptions, one
    per call.
    """

    def __init__(
        self, task_name: str, *, returns: Any = _UNSET, raises: Any = None, side_effect: Any = None
    ):
        given = [
            n
            for n, v in (
                ("returns", returns is not _UNSET),
                ("raises", raises),
                ("side_effect", side_effect is not None),
            )
            if v
        ]
        if len(given) > 1:
            raise ValueError(
                f"mock_step takes one of returns=, raises=, side_effect=; got {' and '.join(given)}"
            )
        if raises is not None and not _is_exception(raises):
            raise TypeError(f"raises= takes an exception, got {raises!r}")
        self.task_name = task_name
        self.returns = None if returns is _UNSET else returns
        self.raises = raises
        self._effect: Callable[..., Any] | None = None
        self._sequence: Iterator[Any] | None = None
        if side_effect is not None:
            if _is_exception(side_effect):
                self.raises = side_effect
            elif callable(side_effect):
                self._effect = side_effect
            else:
                self._sequence = iter(side_effect)
        self.calls: list[dict[str, Any]] = []

    @property
    def call_count(self) -> int:
        return len(self.calls)

    @property
    def called(self) -> bool:
        return bool(self.calls)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append(dict(kwargs))
        if self.raises is not None:
            raise _instance(self.raises)
        if self._effect is not None:
            return self._effect(*args, **kwargs)
        if self._sequence is not None:
            try:
                item = next(self._sequence)
            except StopIteration:
                raise AssertionError(
                    f"mock of {self.task_name} called more times "
                    f"({len(self.calls)}) than its side_effect has "
                    f"items"
                ) from None
            if _is_exception(item):
                raise _instance(item)
            return item
        return self.returns

    def __repr__(self) -> str:
        return f"<StepMock {self.task_name} calls={len(self.calls)}>"


def _is_exception(value: Any) -> bool:
    return isinstance(value, BaseException) or (
        isinstance(value, type) and issubclass(value, BaseException)
    )


def _instance(exc: Any) -> BaseException:
    return exc() if isinstance(exc, type) else exc  # type: ignore[no-any-return]


def task_name_of(task: Any) -> str:
    name = task if isinstance(task, str) else getattr(task, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"mock_step needs a Celery task or a task name, got {task!r}")
    return name
