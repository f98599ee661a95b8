"""What a saga is made of: task references, retry policies, step responses, the step graph."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Union

from celery.app.task import Task
from celery.local import PromiseProxy

from .exceptions import DefinitionError, StepFailure
from .states import FailureStrategy

if TYPE_CHECKING:
    from .definition import Saga

Context = dict[str, Any]
TaskRef = Union[Task, str]  # noqa: UP007 - a runtime alias on 3.10
ContextFn = Callable[[Context], Any]


MAX_RETRY_DELAY = 30 * 24 * 3600.0


# Where retry jitter comes from; a test environment seeds its own, so that its timelines
# repeat from run to run.
jitter_source = random.Random()


@dataclass(frozen=True)
class Retry:
    """Retry policy: `max_attempts` in all, the n-th retry delayed by backoff * factor**(n-1).

    Delays are capped at `max_delay`, with +/- `jitter` (a fraction) so retries of
    many sagas do not arrive together. No worker sleeps and no broker holds the
    message: it is published when due (see `runtime.DelayedPublisher`).
    """

    max_attempts: int = 1
    backoff: float = 1.0
    factor: float = 2.0
    max_delay: float = 300.0
    jitter: float = 0.1

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise DefinitionError(f"Retry.max_attempts must be >= 1, got {self.max_attempts}")
        for field_name in ("backoff", "factor", "max_delay", "jitter"):
            value = getattr(self, field_name)
            if not math.isfinite(value):
                raise DefinitionError(f"Retry.{field_name} must be a finite number, got {value}")
        if self.backoff < 0 or self.factor < 1 or self.max_delay < 0:
            raise DefinitionError("Retry needs backoff >= 0, factor >= 1 and max_delay >= 0")
        if self.max_delay > MAX_RETRY_DELAY:
            # A retry waits in the store (its due time) and in the deciding process; one
            # due months from now is a scheduled job, not a retry, and most likely a typo.
            raise DefinitionError(
                f"Retry.max_delay must be <= {MAX_RETRY_DELAY:.0f} s (30 "
                f"days), got {self.max_delay}"
            )

    def delay(self, failed_attempt: int) -> float:
        """Seconds to wait after attempt number `failed_attempt` (1-based) failed."""
        base = min(self.max_delay, self.backoff * self.factor ** max(0, failed_attempt - 1))
        if self.jitter and base:
            base *= 1 + jitter_source.uniform(-self.jitter, self.jitter)
        return max(0.0, base)


NO_RETRY = Retry()
# A compensation must eventually succeed: by default it is retried for about ten minutes.
DEFAULT_COMPENSATION_RETRY = Retry(max_attempts=15, backoff=1.0, factor=2.0, max_delay=60.0)


@dataclass(frozen=True)
class FailFastWithGrace:
    """FAIL_FAST_WITH_GRACE(grace=seconds): wait up to `grace` for in-flight steps."""

    grace: float

    @property
    def strategy(self) -> FailureStrategy:
        return FailureStrategy.FAIL_FAST_WITH_GRACE


def FAIL_FAST_WITH_GRACE(grace: float = 30.0) -> FailFastWithGrace:
    return FailFastWithGrace(grace=grace)


class StepResponse:
    """What a step returns when its compensation needs other data than its output."""

    __slots__ = ("compensation_data", "output")

    _UNSET: Any = StepFailure._UNSET

    def __init__(self, output: Any = None, compensation_data: Any = _UNSET):
        self.output = output
        self.compensation_data = compensation_data

    @property
    def has_compensation_data(self) -> bool:
        return self.compensation_data is not StepResponse._UNSET

    @staticmethod
    def permanent_failure(message: str, *, compensation_data: Any = _UNSET) -> StepFailure:
        """An exception to raise: fail now, skip retries, compensate (this step too if data)."""
        return StepFailure(message, compensation_data=compensation_data)

    def __repr__(self) -> str:
        return f"StepResponse(output={self.output!r})"


def saga_step(*, compensate: TaskRef) -> Callable[[Any], Any]:
    """Declare the default compensation of a Celery task used as a saga step."""
    check_task_ref(compensate, what="compensation", saga=None, step=None)

    def decorate(task: Any) -> Any:
        if not is_task(task):
            raise DefinitionError("@saga_step must decorate a Celery task: put it above @app.task")
        if isinstance(task, PromiseProxy) and not task.__evaluated__():
            # Do not force the task into existence before the app is configured:
            # attach the compensation when Celery creates it.
            task.__then__(_set_default_compensation, task, compensate)
        else:
            _set_default_compensation(task, compensate)
        return task

    return decorate


def _set_default_compensation(task: Any, compensate: TaskRef) -> None:
    target = task._get_current_object() if isinstance(task, PromiseProxy) else task
    type(target).sagaline_compensate = compensate


def task_name(ref: TaskRef) -> str:
    return ref if isinstance(ref, str) else str(ref.name)


def is_task(obj: Any) -> bool:
    return isinstance(obj, (PromiseProxy, Task))


def check_task_ref(ref: Any, *, what: str, saga: str | None, step: str | None) -> None:
    if isinstance(ref, str):
        if not ref or any(c.isspace() for c in ref):
            raise DefinitionError(f"{what} {ref!r} is not a task name", saga=saga, step=step)
        return
    if not is_task(ref):
        raise DefinitionError(
            f"{what} must be a Celery task or a task name, got {type(ref).__name__} "
            f"{getattr(ref, '__name__', ref)!r} (decorate it with @app.task)",
            saga=saga,
            step=step,
        )


class StepKind(str, Enum):
    TASK = "task"
    TRANSFORM = "transform"
    SAGA = "saga"  # a child saga, run as its own saga linked to the parent

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Step:
    """One node of a saga's graph. Build them with the `Saga` builder."""

    name: str
    kind: StepKind
    task: TaskRef | None = None
    depends_on: tuple[str, ...] = ()
    compensate: TaskRef | None = None
    input: ContextFn | None = None
    retry: Retry = NO_RETRY
    compensation_retry: Retry = DEFAULT_COMPENSATION_RETRY
    timeout: float | None = None
    when: ContextFn | None = None
    pivot: bool = False
    queue: str | None = None
    transform: ContextFn | None = None
    child: Saga | None = None

    @property
    def compensable(self) -> bool:
        return self.compensate is not None or self.kind == StepKind.SAGA

    @property
    def task_name(self) -> str | None:
        return None if self.task is None else task_name(self.task)

    @property
    def compensation_name(self) -> str | None:
        return None if self.compensate is None else task_name(self.compensate)


@dataclass
class Graph:
    """The validated DAG: steps in a topological order, dependents, ancestors."""

    steps: dict[str, Step]
    order: list[str]
    dependents: dict[str, list[str]]
    ancestors: dict[str, list[str]] = field(default_factory=dict)

    def roots(self) -> list[str]:
        return [n for n in self.order if not self.steps[n].depends_on]


def build_graph(saga_name: str, steps: Iterable[Step]) -> Graph:
    """Validate names and dependencies, detect cycles, and order the steps (Kahn's algorithm)."""
    by_name: dict[str, Step] = {}
    for s in steps:
        if s.name in by_name:
            raise DefinitionError("duplicate step name", saga=saga_name, step=s.name)
        by_name[s.name] = s
    dependents: dict[str, list[str]] = {n: [] for n in by_name}
    for s in by_name.values():
        for d in s.depends_on:
            if d == s.name:
                raise DefinitionError("a step cannot depend on itself", saga=saga_name, step=s.name)
            if d not in by_name:
                raise DefinitionError(f"unknown dependency {d!r}", saga=saga_name, step=s.name)
            dependents[d].append(s.name)
    indegree = {n: len(s.depends_on) for n, s in by_name.items()}
    ready = [n for n in by_name if indegree[n] == 0]
    order: list[str] = []
    while ready:
        n = ready.pop(0)
        order.append(n)
        for m in dependents[n]:
            indegree[m] -= 1
            if indegree[m] == 0:
                ready.append(m)
    if len(order) != len(by_name):
        stuck = sorted(n for n in by_name if n not in order)
        raise DefinitionError(f"dependency cycle through {stuck}", saga=saga_name, step=stuck[0])
    position = {n: i for i, n in enumerate(order)}
    ancestors: dict[str, list[str]] = {}
    for n in order:
        acc: set[str] = set()
        for d in by_name[n].depends_on:
            acc.add(d)
            acc.update(ancestors[d])
        ancestors[n] = sorted(acc, key=position.__getitem__)
    return Graph(by_name, order, dependents, ancestors)
