"""`SagaEnv`: the real engine in one process, on an in-memory broker, in virtual time.

Every message a saga publishes goes, through a JSON round trip (what Celery's json
serializer does), into a queue in this process; `step()` delivers one to its task
through Celery's own tracer (`Task.apply`, with the saga's headers), so the claim,
the body, the completion and the engine's decisions are the production code. Retry
backoffs wait in virtual time; `advance()` moves it and runs the real sweeper at
each moment something falls due (leases, redispatches, deadlines).
"""

from __future__ import annotations

import random
import uuid
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .. import _state, delivery
from .._state import registered_saga
from ..config import Settings
from ..context import current_step
from ..records import HEADER, Dispatch, SagaFilter
from ..runtime import DelayedPublisher, Runtime
from ..states import SAGA_TERMINAL, Phase, SagaStatus
from ..steps import StepResponse
from ..stores.base import Store
from ..stores.memory import MemoryStore
from .clock import VirtualClock, parse_duration
from .faults import Faults, InjectedFailure, SimulatedCrash
from .messages import BodyRun, Delivery, Message, NoHeartbeat, VirtualTimers
from .mocks import StepMock, task_name_of

if TYPE_CHECKING:
    from celery import Celery

    from ..definition import Saga
    from ..handle import SagaHandle
    from ..sweeper import SweepReport


# Sweeper passes a run may make without delivering a message (each moves virtual time
# to the next due item): far more than any saga needs, few enough to end a stuck one.
MAX_IDLE_SWEEPS = 10_000


class SimRuntime(Runtime):
    """A Runtime whose broker is the environment's queue and whose clock is virtual."""

    env: SagaEnv

    def _publish_one(self, d: Dispatch) -> None:
        if d.child_saga is not None:
            super()._publish_one(d)  # a child saga starts in-process, as in a worker
            return
        self.env._publish(d)

    def delayed_publisher(self) -> DelayedPublisher:
        return self.env.timers

    def heartbeat(self) -> Any:
        return NoHeartbeat()

    def execute(
        self,
        task: Any,
        body: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        meta: dict[str, Any],
    ) -> Any:
        return super().execute(task, self.env._instrument(task, body, meta), args, kwargs, meta)


class SagaEnv:
    """The real engine in-process: start sagas, deliver their messages, move time.

    Installs itself as the sagaline runtime of the given Celery apps (default: every
    app that called `init_app`, else Celery's current app) until `close()`.
    """

    def __init__(
        self,
        apps: list[Celery] | None = None,
        *,
        store: Store | None = None,
        clock: VirtualClock | None = None,
        faults: Faults | None = None,
        seed: int = 0,
        **settings: Any,
    ):
        from .. import celery_app, steps

        self.clock = clock or VirtualClock()
        self.clock.env = self
        self.faults = faults or Faults()
        self.store = store or MemoryStore()
        self.apps = apps or _sagaline_apps()
        # No sweeper thread: `sweep()` and virtual time run the sweeper's passes.
        conf = Settings.from_env(**{**settings, "store_url": self.store.url, "sweeper": False})
        self.runtime = SimRuntime(self.apps[0], conf, store=self.store)
        self.runtime.env = self
        self.runtime.clock = self.clock
        self.timers = VirtualTimers(self.clock)
        self.queue: deque[Message] = deque()
        self.deliveries: list[Delivery] = []
        self.body_runs: list[BodyRun] = []
        self.mocks: dict[str, StepMock] = {}
        self._previous = [(app, app.__dict__.get("_sagaline_runtime")) for app in self.apps]
        self._previous_default = _state._default_runtime
        for app in self.apps:
            app._sagaline_runtime = self.runtime
            celery_app._install_step_wrapper(app)
        _state.set_default_runtime(self.runtime)
        # Retry jitter from a seeded generator: the same test, the same timeline.
        self._previous_jitter = steps.jitter_source
        steps.jitter_source = random.Random(seed)

    def close(self) -> None:
        """Give the apps their own runtimes back."""
        for app, runtime in self._previous:
            if runtime is None:
                app.__dict__.pop("_sagaline_runtime", None)
            else:
                app._sagaline_runtime = runtime
        _state._default_runtime = self._previous_default
        from .. import steps

        steps.jitter_source = self._previous_jitter

    def __enter__(self) -> SagaEnv:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- starting ------------------------------------------------------------------

    def start(
        self,
        saga: Saga | str,
        *,
        idempotency_key: str | None = None,
        saga_id: str | None = None,
        **input: Any,
    ) -> SagaHandle:
        """Start a saga (as `saga.run(...)` would); nothing runs until messages are."""
        defn = registered_saga(saga) if isinstance(saga, str) else saga
        if defn is None:
            raise LookupError(f"no saga named {saga!r} is defined in this process")
        return self.runtime.start_saga(
            defn, input, idempotency_key=idempotency_key, saga_id=saga_id
        )

    def run(
        self, saga: Saga | str, *, idempotency_key: str | None = None, **input: Any
    ) -> SagaHandle:
        """Start a saga and run it (and whatever else is pending) to the end."""
        handle = self.start(saga, idempotency_key=idempotency_key, **input)
        self.run_until_done()
        return handle

    def mock(self, task: Any, **behaviour: Any) -> StepMock:
        """Replace the body of `task` (a step or a compensation): see `StepMock`."""
        name = task_name_of(task)
        mock = StepMock(name, **behaviour)
        self.mocks[name] = mock
        return mock

    # -- the broker ----------------------------------------------------------------

    def _publish(self, d: Dispatch) -> None:
        from kombu.serialization import dumps, loads

        task = self.task(d.task_name)
        kwargs = dict(d.kwargs)
        if task is not None:
            from ..execution import filter_kwargs

            kwargs = filter_kwargs(task.run, kwargs)
        meta = {
            "saga_id": d.saga_id,
            "saga": d.saga_name,
            "fingerprint": d.fingerprint,
            "step": d.step,
            "phase": d.phase.value,
            "attempt": d.attempt,
        }
        # What the json serializer makes of it: an unsendable value fails here as in
        # apply_async (kombu's EncodeError), and the task gets what a worker would.
        content_type, encoding, data = dumps(kwargs, serializer="json")  # type: ignore[no-untyped-call]
        kwargs = loads(data, content_type, encoding)  # type: ignore[no-untyped-call]
        if self.faults.take("lose_message", d.step, d.task_name, d.phase):
            return
        copies = 2 if self.faults.take("duplicate", d.step, d.task_name, d.phase) else 1
        for _ in range(copies):
            self.queue.append(Message(uuid.uuid4().hex, d.task_name, dict(kwargs), dict(meta)))

    def task(self, name: str) -> Any:
        """The task registered under `name` in one of this environment's apps, or None."""
        for app in self.apps:
            task = app.tasks.get(name)
            if task is not None:
                return task
        return None

    def step(self) -> Delivery | None:
        """Deliver the next message, if any; None when the queue is empty."""
        self._release_due()
        if not self.queue:
            return None
        return self._deliver(self.queue.popleft())

    def _deliver(self, msg: Message) -> Delivery:
        phase = msg.phase
        if self.faults.take("crash_before_claim", msg.step, msg.task_name, phase):
            return self._delivered(msg, "crashed")
        task = self.task(msg.task_name)
        if task is None:
            delivery.message_refused(
                self.runtime,
                msg.meta,
                task=msg.task_name,
                worker="saga_env",
                unregistered=True,
                error=f"task {msg.task_name!r} is not registered",
            )
            return self._delivered(msg, "refused")
        try:
            result = task.apply(
                args=(), kwargs=msg.kwargs, task_id=msg.id, throw=False, headers={HEADER: msg.meta}
            )
        except SimulatedCrash:
            return self._delivered(msg, "crashed")
        return self._delivered(msg, str(result.state))

    def _delivered(self, msg: Message, outcome: str) -> Delivery:
        d = Delivery(msg, outcome)
        self.deliveries.append(d)
        return d

    def _instrument(
        self, task: Any, body: Callable[..., Any], meta: dict[str, Any]
    ) -> Callable[..., Any]:
        inner: Callable[..., Any] = self.mocks.get(task.name) or body
        step, phase, attempt = str(meta["step"]), Phase(meta["phase"]), int(meta["attempt"])

        def run_body(*args: Any, **kwargs: Any) -> Any:
            run = BodyRun(
                str(meta["saga_id"]), step, phase, attempt, current_step().idempotency_key
            )
            self.body_runs.append(run)
            take = self.faults.take
            if phase is Phase.COMPENSATE and take("fail_compensation", step, task.name, phase):
                run.outcome = "raised"
                raise InjectedFailure(f"compensation of {step} failed (injected)")
            try:
                result = inner(*args, **kwargs)
            except BaseException:
                run.outcome = "raised"
                raise
            run.outcome = "returned"
            if take("crash_after_body", step, task.name, phase):
                run.outcome = "crashed"
                raise SimulatedCrash(f"worker died after the body of {step}")
            if take("expire_lease", step, task.name, phase):
                self._outlive_lease(run)
            if take("fail_after_body", step, task.name, phase):
                run.outcome = "failed_after_body"
                data = (
                    result.compensation_data
                    if isinstance(result, StepResponse) and result.has_compensation_data
                    else getattr(result, "output", result)
                )
                raise StepResponse.permanent_failure(
                    f"{step} failed after applying its change (injected)", compensation_data=data
                )
            return result

        return run_body

    def _outlive_lease(self, run: BodyRun) -> None:
        state = self.store.read_state(run.saga_id)
        rec = None if state is None else state.steps.get(run.step)
        if rec is not None and rec.lease_until is not None:
            self.clock.move_to(rec.lease_until + 0.001)
        self.sweep()

    # -- time ----------------------------------------------------------------------

    def _release_due(self) -> None:
        due = self.timers.pop_due(self.clock())
        if due:
            self.runtime.publish(due)

    def sweep(self) -> SweepReport:
        """One pass of the real sweeper at the current (virtual) time."""
        from .. import sweeper

        self._release_due()
        return sweeper.sweep(self.runtime)

    def next_due(self, until: float) -> float | None:
        """The next moment, up to `until`, when a retry or a sweeper item falls due."""
        moments = [t for t in (self.timers.next_due(),) if t is not None]
        items = self.store.find_due(until, limit=1)
        if items:
            moments.append(items[0].due_at)
        return min(moments) if moments else None

    def advance(
        self, duration: float | str, *, run: bool = True, max_messages: int = 100_000
    ) -> None:
        """Move virtual time forward by `duration`, firing each thing at its moment."""
        target = self.clock() + parse_duration(duration)
        budget = max_messages
        for _ in range(MAX_IDLE_SWEEPS):
            moment = self.next_due(target)
            if moment is None or moment > target:
                break
            self.clock.move_to(moment)
            self.sweep()
            if run:
                budget -= self._drain(budget)
        self.clock.move_to(target)
        self.sweep()
        if run:
            self._drain(budget)

    def _drain(self, limit: int) -> int:
        n = 0
        while n < limit and self.step() is not None:
            n += 1
        if self.queue:
            raise RuntimeError(
                f"saga_env: still {len(self.queue)} messages after "
                f"delivering {limit}; a saga that never ends?"
            )
        return n

    # -- running to the end --------------------------------------------------------

    def unfinished(self) -> list[str]:
        """Ids of the sagas in the store that have not ended."""
        running = [s for s in SagaStatus if s not in SAGA_TERMINAL]
        return [s.saga_id for s in self.store.list_sagas(SagaFilter(status=running, limit=10_000))]

    def run_until_done(self, *, max_messages: int = 10_000, max_time: float | str = "365d") -> int:
        """Deliver messages until every saga has ended; returns how many were delivered.

        When nothing is left to deliver but a saga waits (a retry's backoff, a lost
        message, an expired lease, its deadline), virtual time jumps to that moment
        and the sweeper runs, as it would in a worker.
        """
        horizon = self.clock() + parse_duration(max_time)
        delivered = 0
        # Bounded twice: in messages, and in sweeper passes that deliver nothing.
        for _ in range(max_messages + MAX_IDLE_SWEEPS):
            if delivered >= max_messages:
                break
            if self.step() is not None:
                delivered += 1
                continue
            if not self.unfinished():
                return delivered
            moment = self.next_due(horizon)
            if moment is None:
                raise RuntimeError(
                    f"saga_env: sagas {self.unfinished()} wait for nothing that will ever "
                    f"happen (no message, no retry, nothing due before +{max_time})"
                )
            self.clock.move_to(moment)
            self.sweep()
        raise RuntimeError(
            f"saga_env: sagas still running after {delivered} messages: {self.unfinished()}"
        )


def _sagaline_apps() -> list[Celery]:
    from celery import current_app
    from celery._state import _get_active_apps

    apps = [a for a in _get_active_apps() if a.__dict__.get("_sagaline_runtime") is not None]
    return apps or [current_app._get_current_object()]
