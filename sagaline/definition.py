"""Saga definitions: the builder, steps, retry policies and step responses; validation, no I/O."""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import math
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Union

from celery.app.task import Task
from celery.local import PromiseProxy

from . import _state
from ._state import forget as forget  # re-exported: definitions are looked up here
from ._state import registered_saga as registered_saga
from .exceptions import DefinitionError, StepFailure
from .payload import MAX_NAME_LENGTH, RESERVED_KEYS, check_text
from .states import FailureStrategy

if TYPE_CHECKING:
    from .handle import SagaHandle

Context = dict[str, Any]
TaskRef = Union[Task, str]  # noqa: UP007 - a runtime alias on 3.10
ContextFn = Callable[[Context], Any]

def check_definitions() -> None:
    """Raise DefinitionError for any saga of this process that is incomplete or clashes.

    A worker calls it once the modules of its app are imported, before it takes a
    message: a broken definition stops it from starting, as an ImportError would.
    """
    for defn in sorted(_state.definitions(), key=lambda d: d.name):
        defn.check_complete()


MAX_RETRY_DELAY = 30 * 24 * 3600.0


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
            raise DefinitionError(f"Retry.max_delay must be <= {MAX_RETRY_DELAY:.0f} s (30 "
                                  f"days), got {self.max_delay}")

    def delay(self, failed_attempt: int) -> float:
        """Seconds to wait after attempt number `failed_attempt` (1-based) failed."""
        base = min(self.max_delay, self.backoff * self.factor ** max(0, failed_attempt - 1))
        if self.jitter and base:
            base *= 1 + random.uniform(-self.jitter, self.jitter)
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
    _check_task_ref(compensate, what="compensation", saga=None, step=None)

    def decorate(task: Any) -> Any:
        if not _is_task(task):
            raise DefinitionError(
                "@saga_step must decorate a Celery task: put it above @app.task"
            )
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


def _is_task(obj: Any) -> bool:
    return isinstance(obj, (PromiseProxy, Task))


def _check_task_ref(ref: Any, *, what: str, saga: str | None, step: str | None) -> None:
    if isinstance(ref, str):
        if not ref or any(c.isspace() for c in ref):
            raise DefinitionError(f"{what} {ref!r} is not a task name", saga=saga, step=step)
        return
    if not _is_task(ref):
        raise DefinitionError(
            f"{what} must be a Celery task or a task name, got {type(ref).__name__} "
            f"{getattr(ref, '__name__', ref)!r} (decorate it with @app.task)",
            saga=saga,
            step=step,
        )


class StepKind:
    TASK = "task"
    TRANSFORM = "transform"
    SAGA = "saga"  # a child saga, run as its own saga linked to the parent


@dataclass(frozen=True)
class Step:
    """One node of a saga's graph. Build them with the `Saga` builder."""

    name: str
    kind: str
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
                raise DefinitionError("a step cannot depend on itself", saga=saga_name,
                                      step=s.name)
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


class Parallel(tuple):  # type: ignore[type-arg]
    """A group of tasks for `Saga.add_step`, made by `parallelize`."""


class Saga:
    """A saga definition, built step by step at module level.

    >>> order_saga = (Saga("order_saga")
    ...     .add_step(validate_order, no_compensation=True)
    ...     .add_step(charge_payment, retry=Retry(max_attempts=3))
    ...     .add_parallel(reserve_inventory, book_courier))

    Steps without `depends_on` follow the previous stage; with it, any DAG. The
    definition is registered under its name so that every worker that imports
    the module can advance the saga.
    """

    def __init__(
        self,
        name: str,
        *,
        failure_strategy: FailureStrategy | FailFastWithGrace = FailureStrategy.FAIL_FAST,
        timeout: float | None = None,
        queue: str | None = None,
        pivot_retry: Retry | None = None,
    ):
        if not isinstance(name, str):
            raise DefinitionError(f"a saga name is a string, got {type(name).__name__}")
        check_text(name, "saga name", limit=MAX_NAME_LENGTH, error=DefinitionError)
        if timeout is not None and timeout <= 0:
            raise DefinitionError(f"timeout must be positive, got {timeout}", saga=name)
        self.name = name
        self.timeout = timeout
        self.queue = queue
        if isinstance(failure_strategy, FailFastWithGrace):
            self.failure_strategy = FailureStrategy.FAIL_FAST_WITH_GRACE
            self.grace: float = failure_strategy.grace
        else:
            self.failure_strategy = FailureStrategy(failure_strategy)
            if self.failure_strategy is FailureStrategy.FAIL_FAST_WITH_GRACE:
                raise DefinitionError("use FAIL_FAST_WITH_GRACE(grace=...) with a grace period",
                                      saga=name)
            self.grace = 0.0
        # After a pivot succeeded, failed steps are retried forward with this policy.
        self.pivot_retry = pivot_retry or Retry(max_attempts=10, backoff=1.0, max_delay=60.0)
        self._steps: list[Step] = []
        self._stage: list[str] = []
        self._graph: Graph | None = None
        self._fingerprint: str | None = None
        self.result_spec: Any = None
        self.defined_at = _state.defined_at()
        self._checked: str | None = None
        # The first definition of a name owns it; this one, if not the first, must
        # follow it step by step (checked in _append, and in check_complete).
        self._owner: Saga = _state.register(self)

    # -- builder -----------------------------------------------------------------

    def add_step(
        self,
        task: TaskRef | Parallel,
        *,
        name: str | None = None,
        compensate: TaskRef | None = None,
        no_compensation: bool = False,
        depends_on: Iterable[str] | None = None,
        input: ContextFn | None = None,
        retry: Retry | None = None,
        compensation_retry: Retry | None = None,
        timeout: float | None = None,
        when: ContextFn | None = None,
        pivot: bool = False,
        queue: str | None = None,
    ) -> Saga:
        if isinstance(task, Parallel):
            if name is not None or depends_on is not None:
                raise DefinitionError("parallelize(...) takes neither name= nor depends_on=",
                                      saga=self.name)
            return self.add_parallel(*task, compensate=compensate,
                                     no_compensation=no_compensation, input=input, retry=retry,
                                     compensation_retry=compensation_retry, timeout=timeout,
                                     when=when, pivot=pivot, queue=queue)
        step = self._make_step(task, name=name, compensate=compensate,
                               no_compensation=no_compensation, depends_on=depends_on,
                               input=input, retry=retry, compensation_retry=compensation_retry,
                               timeout=timeout, when=when, pivot=pivot, queue=queue)
        self._append([step])
        return self

    def add_parallel(self, *tasks: TaskRef, **options: Any) -> Saga:
        """Add steps that all follow the previous stage and run concurrently.

        `options` (compensate excepted) apply to each of them.
        """
        if not tasks:
            raise DefinitionError("add_parallel needs at least one task", saga=self.name)
        if "name" in options or "depends_on" in options:
            raise DefinitionError("add_parallel takes neither name= nor depends_on=; use "
                                  "add_step(..., depends_on=[...]) for named branches",
                                  saga=self.name)
        steps = [self._make_step(t, depends_on=None, **options) for t in tasks]
        self._append(steps)
        return self

    def add_transform(self, fn: ContextFn, *, name: str | None = None,
                      depends_on: Iterable[str] | None = None) -> Saga:
        """Transform the context for the steps that follow: `fn(ctx) -> new ctx`.

        It runs inside the engine (no message); keys it adds or changes are merged
        into the context of the steps after it. It cannot delete keys.
        """
        if not callable(fn):
            raise DefinitionError("add_transform needs a callable", saga=self.name)
        step_name = name or f"transform_{len(self._steps) + 1}"
        deps = tuple(self._stage) if depends_on is None else tuple(depends_on)
        step = Step(name=step_name, kind=StepKind.TRANSFORM, depends_on=deps, transform=fn)
        self._append([step])
        return self

    def add_saga(self, child: Saga, *, name: str | None = None,
                 depends_on: Iterable[str] | None = None, when: ContextFn | None = None,
                 retry: Retry | None = None) -> Saga:
        """A step that runs `child` as its own saga, linked to this one.

        The child receives this step's context as its input; its final context
        (what it added) is this step's output. If the child is compensated, this
        step fails; if this saga later rolls back, a completed child is
        compensated as a whole, in its own reverse order.
        """
        if not isinstance(child, Saga):
            raise DefinitionError(f"add_saga needs a Saga, got {type(child).__name__}",
                                  saga=self.name, step=name)
        if child is self:
            raise DefinitionError("a saga cannot contain itself", saga=self.name, step=name)
        deps = tuple(self._stage) if depends_on is None else tuple(depends_on)
        step = Step(name=name or child.name, kind=StepKind.SAGA, depends_on=deps, when=when,
                    retry=retry or NO_RETRY, child=child)
        self._append([step])
        return self

    def set_result(self, spec: Any) -> None:
        """What `get()` returns: None for the final context, or a spec made by `@saga`."""
        self.result_spec = spec
        self._fingerprint = None

    def _make_step(self, task: TaskRef, *, name: str | None = None,
                   compensate: TaskRef | None = None, no_compensation: bool = False,
                   depends_on: Iterable[str] | None = None, input: ContextFn | None = None,
                   retry: Retry | None = None, compensation_retry: Retry | None = None,
                   timeout: float | None = None, when: ContextFn | None = None,
                   pivot: bool = False, queue: str | None = None) -> Step:
        _check_task_ref(task, what="step", saga=self.name, step=name)
        step_name = name or _default_step_name(task)
        if compensate is not None and no_compensation:
            raise DefinitionError("compensate= and no_compensation=True exclude each other",
                                  saga=self.name, step=step_name)
        if compensate is None and not no_compensation and not isinstance(task, str):
            compensate = getattr(task, "sagaline_compensate", None)
        if compensate is not None:
            _check_task_ref(compensate, what="compensation", saga=self.name, step=step_name)
        for label, fn in (("input", input), ("when", when)):
            if fn is not None and not callable(fn):
                raise DefinitionError(f"{label}= must be callable", saga=self.name,
                                      step=step_name)
        if timeout is not None and timeout <= 0:
            raise DefinitionError(f"timeout must be positive, got {timeout}", saga=self.name,
                                  step=step_name)
        deps = tuple(self._stage) if depends_on is None else tuple(depends_on)
        if isinstance(depends_on, str):
            raise DefinitionError("depends_on takes a list of step names", saga=self.name,
                                  step=step_name)
        return Step(name=step_name, kind=StepKind.TASK, task=task, depends_on=deps,
                    compensate=compensate, input=input, retry=retry or NO_RETRY,
                    compensation_retry=compensation_retry or DEFAULT_COMPENSATION_RETRY,
                    timeout=timeout, when=when, pivot=pivot, queue=queue or self.queue)

    def _append(self, steps: list[Step]) -> None:
        known = {s.name for s in self._steps}
        for s in steps:
            _check_step_name(self.name, s.name)
            for d in s.depends_on:
                if d not in known:
                    raise DefinitionError(
                        f"unknown dependency {d!r} (a step can depend only on steps added "
                        f"before it)", saga=self.name, step=s.name)
        candidate = [*self._steps, *steps]
        build_graph(self.name, candidate)  # raises on duplicates and cycles
        self._follow_owner(candidate)
        self._steps = candidate
        self._stage = [s.name for s in steps]
        self._graph = None
        self._fingerprint = None

    def _follow_owner(self, candidate: list[Step]) -> None:
        """A second definition of a name must add the steps of the first, in order: the
        first step that differs raises here, while the module is being imported."""
        owner = self._owner
        if owner is self:
            return
        for i in range(len(self._steps), len(candidate)):
            if i >= len(owner._steps) or _step_parts(candidate[i]) != _step_parts(
                    owner._steps[i]):
                raise DefinitionError(
                    f"another saga with this name, defined at {owner.defined_at}, has other "
                    f"steps (they differ at step #{i + 1}); saga names must be unique",
                    saga=self.name, step=candidate[i].name)

    def check_complete(self) -> None:
        """Raise DefinitionError unless this definition is complete and owns its name.

        A builder saga grows one `add_*` call at a time, so sagaline cannot tell when
        its last step has been added while the module is still running. It checks
        what it can at once (each step, the graph, a clash with the first definition
        of the name) and the rest -- at least one step, the same fingerprint as the
        definition that owns the name -- when the definition is complete: at the end
        of `@saga`, at `run()`, and when a worker has imported its app's modules
        (`check_definitions`), before it takes a message.
        """
        fingerprint = self.fingerprint
        if self._checked == fingerprint:
            return
        if not self._steps:
            raise DefinitionError(f"a saga needs at least one step (defined at "
                                  f"{self.defined_at})", saga=self.name)
        if self._owner is not self and self._owner.fingerprint != fingerprint:
            raise DefinitionError(
                f"two different sagas have this name: at {self._owner.defined_at} and at "
                f"{self.defined_at}; saga names must be unique", saga=self.name)
        for s in self._steps:
            if s.child is not None:
                s.child.check_complete()
        self._checked = fingerprint

    # -- derived -----------------------------------------------------------------

    @property
    def steps(self) -> list[Step]:
        return list(self._steps)

    @property
    def graph(self) -> Graph:
        if self._graph is None:
            if not self._steps:
                raise DefinitionError("a saga needs at least one step", saga=self.name)
            self._graph = build_graph(self.name, self._steps)
        return self._graph

    @property
    def fingerprint(self) -> str:
        """A hash of the definition's shape; a worker with other code refuses to advance it."""
        if self._fingerprint is None:
            h = hashlib.sha256(self.name.encode())
            for s in self._steps:
                h.update("|".join(_step_parts(s)).encode())
            h.update(repr(self.result_spec).encode())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def run(self, *, idempotency_key: str | None = None, **input: Any) -> SagaHandle:
        """Start an execution; returns at once with a handle to wait on.

        A second `run` with the same saga name, `idempotency_key` and input returns
        the existing execution instead of starting another, even once it has ended;
        the same key with other input raises IdempotencyConflict. Input that a
        message cannot carry (see `sagaline.payload`) raises InputError before
        anything is stored.
        """
        return _state.current_runtime().start_saga(self, input, idempotency_key=idempotency_key)

    def __repr__(self) -> str:
        return f"<Saga {self.name!r} steps={[s.name for s in self._steps]}>"


def _step_parts(s: Step) -> list[str]:
    """What the fingerprint takes from one step."""
    return [s.name, s.kind, s.task_name or "", ",".join(s.depends_on),
            s.compensation_name or "", str(s.pivot), _code_id(s.input), _code_id(s.when),
            _code_id(s.transform), s.child.fingerprint if s.child is not None else ""]


def _check_step_name(saga: str, name: Any) -> None:
    if not isinstance(name, str):
        raise DefinitionError(f"a step name is a string, got {type(name).__name__}", saga=saga)
    check_text(name, "step name", limit=MAX_NAME_LENGTH, error=DefinitionError, saga=saga)
    if name in RESERVED_KEYS:
        # A non-dict output is stored in the context under the step's name.
        raise DefinitionError(f"{name!r} is a reserved context key; name the step otherwise",
                              saga=saga, step=name)


def _default_step_name(task: TaskRef) -> str:
    return short_name(task_name(task))


def short_name(dotted: str) -> str:
    """`shop.tasks.charge_payment` -> `charge_payment`."""
    return dotted.rsplit(".", 1)[-1]


def _code_id(fn: Callable[..., Any] | None) -> str:
    if fn is None:
        return ""
    code = getattr(fn, "__code__", None)
    if code is None:
        return getattr(fn, "__qualname__", type(fn).__qualname__)
    return hashlib.sha256(code.co_code + repr(code.co_consts).encode()).hexdigest()[:12]


_SIGNATURES: dict[Any, frozenset[str] | None] = {}


def accepted_kwargs(fn: Callable[..., Any]) -> frozenset[str] | None:
    """Names a callable accepts as keywords; None when it takes **kwargs."""
    try:
        return _SIGNATURES[fn]
    except (KeyError, TypeError):
        pass
    names: set[str] = set()
    result: frozenset[str] | None
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        params = []  # type: ignore[assignment]
    for p in params:
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            result = None
            break
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
            names.add(p.name)
    else:
        result = frozenset(names)
    with contextlib.suppress(TypeError):  # unhashable callables are simply not cached
        _SIGNATURES[fn] = result
    return result


def filter_kwargs(fn: Callable[..., Any], values: Mapping[str, Any]) -> dict[str, Any]:
    accepted = accepted_kwargs(fn)
    if accepted is None:
        return dict(values)
    return {k: v for k, v in values.items() if k in accepted}
