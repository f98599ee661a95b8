"""Saga definitions: the `Saga` builder and its checks; validation, no I/O."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from . import _state
from ._state import forget as forget  # re-exported: definitions are looked up here
from ._state import registered_saga as registered_saga
from .exceptions import DefinitionError
from .fingerprint import fingerprint, step_parts
from .names import check_saga_name, check_step_name, default_step_name
from .names import short_name as short_name  # re-exported: functional and ops use it
from .states import FailureStrategy
from .steps import (
    DEFAULT_COMPENSATION_RETRY,
    NO_RETRY,
    ContextFn,
    FailFastWithGrace,
    Graph,
    Retry,
    Step,
    StepKind,
    TaskRef,
    build_graph,
    check_task_ref,
)

if TYPE_CHECKING:
    from .handle import SagaHandle


def check_definitions() -> None:
    """Raise DefinitionError for any saga of this process that is incomplete or clashes.

    A worker calls it once the modules of its app are imported, before it takes a
    message: a broken definition stops it from starting, as an ImportError would.
    """
    for defn in sorted(_state.definitions(), key=lambda d: d.name):
        defn.check_complete()


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
        check_saga_name(name)
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
                raise DefinitionError(
                    "use FAIL_FAST_WITH_GRACE(grace=...) with a grace period", saga=name
                )
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
                raise DefinitionError(
                    "parallelize(...) takes neither name= nor depends_on=", saga=self.name
                )
            return self.add_parallel(
                *task,
                compensate=compensate,
                no_compensation=no_compensation,
                input=input,
                retry=retry,
                compensation_retry=compensation_retry,
                timeout=timeout,
                when=when,
                pivot=pivot,
                queue=queue,
            )
        step = self._make_step(
            task,
            name=name,
            compensate=compensate,
            no_compensation=no_compensation,
            depends_on=depends_on,
            input=input,
            retry=retry,
            compensation_retry=compensation_retry,
            timeout=timeout,
            when=when,
            pivot=pivot,
            queue=queue,
        )
        self._append([step])
        return self

    def add_parallel(self, *tasks: TaskRef, **options: Any) -> Saga:
        """Add steps that all follow the previous stage and run concurrently.

        `options` (compensate excepted) apply to each of them.
        """
        if not tasks:
            raise DefinitionError("add_parallel needs at least one task", saga=self.name)
        if "name" in options or "depends_on" in options:
            raise DefinitionError(
                "add_parallel takes neither name= nor depends_on=; use "
                "add_step(..., depends_on=[...]) for named branches",
                saga=self.name,
            )
        steps = [self._make_step(t, depends_on=None, **options) for t in tasks]
        self._append(steps)
        return self

    def add_transform(
        self, fn: ContextFn, *, name: str | None = None, depends_on: Iterable[str] | None = None
    ) -> Saga:
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

    def add_saga(
        self,
        child: Saga,
        *,
        name: str | None = None,
        depends_on: Iterable[str] | None = None,
        when: ContextFn | None = None,
        retry: Retry | None = None,
    ) -> Saga:
        """A step that runs `child` as its own saga, linked to this one.

        The child receives this step's context as its input; its final context
        (what it added) is this step's output. If the child is compensated, this
        step fails; if this saga later rolls back, a completed child is
        compensated as a whole, in its own reverse order.
        """
        if not isinstance(child, Saga):
            raise DefinitionError(
                f"add_saga needs a Saga, got {type(child).__name__}", saga=self.name, step=name
            )
        if child is self:
            raise DefinitionError("a saga cannot contain itself", saga=self.name, step=name)
        deps = tuple(self._stage) if depends_on is None else tuple(depends_on)
        step = Step(
            name=name or child.name,
            kind=StepKind.SAGA,
            depends_on=deps,
            when=when,
            retry=retry or NO_RETRY,
            child=child,
        )
        self._append([step])
        return self

    def set_result(self, spec: Any) -> None:
        """What `get()` returns: None for the final context, or a spec made by `@saga`."""
        self.result_spec = spec
        self._fingerprint = None

    def _make_step(
        self,
        task: TaskRef,
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
    ) -> Step:
        check_task_ref(task, what="step", saga=self.name, step=name)
        step_name = name or default_step_name(task)
        if compensate is not None and no_compensation:
            raise DefinitionError(
                "compensate= and no_compensation=True exclude each other",
                saga=self.name,
                step=step_name,
            )
        if compensate is None and not no_compensation and not isinstance(task, str):
            compensate = getattr(task, "sagaline_compensate", None)
        if compensate is not None:
            check_task_ref(compensate, what="compensation", saga=self.name, step=step_name)
        for label, fn in (("input", input), ("when", when)):
            if fn is not None and not callable(fn):
                raise DefinitionError(f"{label}= must be callable", saga=self.name, step=step_name)
        if timeout is not None and timeout <= 0:
            raise DefinitionError(
                f"timeout must be positive, got {timeout}", saga=self.name, step=step_name
            )
        deps = tuple(self._stage) if depends_on is None else tuple(depends_on)
        if isinstance(depends_on, str):
            raise DefinitionError(
                "depends_on takes a list of step names", saga=self.name, step=step_name
            )
        return Step(
            name=step_name,
            kind=StepKind.TASK,
            task=task,
            depends_on=deps,
            compensate=compensate,
            input=input,
            retry=retry or NO_RETRY,
            compensation_retry=compensation_retry or DEFAULT_COMPENSATION_RETRY,
            timeout=timeout,
            when=when,
            pivot=pivot,
            queue=queue or self.queue,
        )

    def _append(self, steps: list[Step]) -> None:
        known = {s.name for s in self._steps}
        for s in steps:
            check_step_name(self.name, s.name)
            for d in s.depends_on:
                if d not in known:
                    raise DefinitionError(
                        f"unknown dependency {d!r} (a step can depend only on steps added "
                        f"before it)",
                        saga=self.name,
                        step=s.name,
                    )
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
            if i >= len(owner._steps) or step_parts(candidate[i]) != step_parts(owner._steps[i]):
                raise DefinitionError(
                    f"another saga with this name, defined at {owner.defined_at}, has other "
                    f"steps (they differ at step #{i + 1}); saga names must be unique",
                    saga=self.name,
                    step=candidate[i].name,
                )

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
            raise DefinitionError(
                f"a saga needs at least one step (defined at {self.defined_at})", saga=self.name
            )
        if self._owner is not self and self._owner.fingerprint != fingerprint:
            raise DefinitionError(
                f"two different sagas have this name: at {self._owner.defined_at} and at "
                f"{self.defined_at}; saga names must be unique",
                saga=self.name,
            )
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
            self._fingerprint = fingerprint(self.name, self._steps, self.result_spec)
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
