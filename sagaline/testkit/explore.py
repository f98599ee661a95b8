"""`explore_failures`: run a saga once per step and fault, and check its invariants.

Each scenario runs in a fresh environment (SagaEnv: the real engine, virtual
time) on a store of its own (as `--sagaline-store` says under pytest), under the
same saga id and idempotency key, so that a `world` snapshot (the user's own view
of their systems) can be compared across scenarios.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._store_option import describe_choice
from ..states import SAGA_TERMINAL, EventKind, Phase, SagaStatus
from ..steps import StepKind, StepResponse
from .env import SagaEnv
from .stores import isolated_store

if TYPE_CHECKING:
    from celery import Celery

    from ..definition import Saga

PERMANENT_FAILURE = "permanent failure"
CRASH_AFTER_BODY = "crash after body"
DUPLICATE = "duplicate delivery"
LOST_MESSAGE = "lost message"
CRASH_AFTER_COMPENSATION = "crash after compensation"
FAULT_KINDS = (
    PERMANENT_FAILURE,
    CRASH_AFTER_BODY,
    DUPLICATE,
    LOST_MESSAGE,
    CRASH_AFTER_COMPENSATION,
)


@dataclass
class Scenario:
    """One run: a fault at a step, how the saga ended, and what broke an invariant."""

    step: str
    fault: str
    status: str = ""
    violations: list[str] = field(default_factory=list)
    fired: list[str] = field(default_factory=list)
    messages: int = 0

    @property
    def ok(self) -> bool:
        return not self.violations

    @property
    def name(self) -> str:
        return f"{self.fault} @ {self.step}" if self.step else self.fault


@dataclass
class ExploreReport:
    """Every scenario explored; `assert_ok()` raises with the violations, if any."""

    saga: str
    scenarios: list[Scenario]
    seconds: float

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.scenarios)

    @property
    def violations(self) -> list[str]:
        return [f"[{s.name}] {v}" for s in self.scenarios for v in s.violations]

    def __str__(self) -> str:
        width = max((len(s.name) for s in self.scenarios), default=10)
        lines = [
            f"explore_failures({self.saga}): {len(self.scenarios)} scenarios in "
            f"{self.seconds:.2f}s, {len(self.violations)} violations"
        ]
        for s in self.scenarios:
            mark = "ok  " if s.ok else "FAIL"
            lines.append(f"  {mark} {s.name:<{width}}  -> {s.status:<11} ({s.messages} messages)")
            lines += [f"         {v}" for v in s.violations]
        return "\n".join(lines)

    def assert_ok(self) -> None:
        if not self.ok:
            raise AssertionError(str(self))


def explore_failures(
    saga: Saga,
    input: dict[str, Any],
    *,
    world: Callable[[], Any] | None = None,
    reset: Callable[[], None] | None = None,
    faults: Sequence[str] = FAULT_KINDS,
    apps: list[Celery] | None = None,
    settings: dict[str, Any] | None = None,
    store: str | None = None,
) -> ExploreReport:
    """Run `saga` with `input` once without faults, then once per step and fault kind,
    checking in each run that:

    - the saga ends in a terminal state;
    - every step that applied is compensated exactly once, in reverse dependency order
      (when the saga rolls back), and none is when it completes;
    - no compensation runs for a step that never ran;
    - with its idempotency key nothing is applied twice: a second `run` with the key
      returns the same saga, and a step's body re-runs only after a crash (with the
      same key) -- never for a duplicate or a lost message.

    `world()` returns a comparable snapshot of the systems the saga changes: after a
    rollback it must equal its value before the saga; after completion, its value
    after the run without faults. `reset()` restores those systems before each run.

    Each scenario runs on a fresh store of its own: `store` is a `--sagaline-store`
    value (memory, sqlite, postgresql://..., redis://...); by default the pytest
    session's `--sagaline-store`, else memory. Steps that use
    `sagaline.step_transaction()` need a SQL store (sqlite or postgresql://...).
    """
    started = time.monotonic()
    unknown = [f for f in faults if f not in FAULT_KINDS]
    if unknown:
        raise ValueError(f"unknown fault kind {unknown[0]!r}; one of {', '.join(FAULT_KINDS)}")
    store_value = store if store is not None else _session_store() or "memory"
    store_kind = describe_choice(store_value)
    tmp_dir = Path(tempfile.mkdtemp(prefix="sagaline-explore-"))
    try:
        explorer = _Explorer(
            saga,
            dict(input),
            world,
            reset,
            apps,
            settings or {},
            (store_kind, store_value, tmp_dir),
        )
        baseline = explorer.run("", "no fault")
        scenarios = [baseline]
        steps = [s for s in saga.steps if s.kind == StepKind.TASK]
        for kind in faults:
            for spec in steps:
                if kind == CRASH_AFTER_COMPENSATION and not spec.compensable:
                    continue
                scenarios.append(explorer.run(spec.name, kind))
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return ExploreReport(saga.name, scenarios, time.monotonic() - started)


def _session_store() -> str | None:
    """The running pytest session's `--sagaline-store` (without importing pytest)."""
    plugin = sys.modules.get("sagaline.pytest_plugin")
    return None if plugin is None else plugin.session_store()


class _Explorer:
    def __init__(
        self,
        saga: Saga,
        input: dict[str, Any],
        world: Callable[[], Any] | None,
        reset: Callable[[], None] | None,
        apps: list[Celery] | None,
        settings: dict[str, Any],
        store: tuple[str, str, Path] | None = None,
    ):
        self.saga = saga
        self.input = input
        self.world = world
        self.reset = reset
        self.apps = apps
        self.settings = settings
        # (kind, value, tmp dir) of isolated_store: each scenario gets a fresh store.
        self.store = store or ("memory", "memory", Path(tempfile.gettempdir()))
        self.saga_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"sagaline-explore:{saga.name}"))
        self.key = f"explore-{saga.name}"
        self.completed_world: Any = None
        self.task_steps = [s.name for s in saga.steps if s.kind == StepKind.TASK]

    def run(self, step: str, kind: str) -> Scenario:
        sc = Scenario(step, kind)
        if self.reset is not None:
            self.reset()
        before = self.world() if self.world is not None else None
        with contextlib.ExitStack() as stack:
            store = stack.enter_context(isolated_store(*self.store))
            env = SagaEnv(self.apps, store=store, **self.settings)
            stack.callback(env.close)
            self._run(env, sc, step, kind)
        if self.world is not None:
            self._check_world(sc, before, self.world())
        return sc

    def _run(self, env: SagaEnv, sc: Scenario, step: str, kind: str) -> None:
        self._arm(env, step, kind)
        handle = env.start(self.saga, idempotency_key=self.key, saga_id=self.saga_id, **self.input)
        again = env.start(self.saga, idempotency_key=self.key, **self.input)
        if again.saga_id != handle.saga_id:
            sc.violations.append(
                f"a second run with idempotency key {self.key!r} "
                f"started another saga ({again.saga_id})"
            )
        try:
            sc.messages = env.run_until_done()
        except RuntimeError as exc:
            sc.violations.append(str(exc))
        sc.fired = list(env.faults.log)
        sc.status = handle.record().status.value
        self._check(env, sc, step, kind)

    def _arm(self, env: SagaEnv, step: str, kind: str) -> None:
        f = env.faults
        if kind == PERMANENT_FAILURE:
            self._fail(env, step)
        elif kind == CRASH_AFTER_BODY:
            f.crash(step, at="after_body")
        elif kind == DUPLICATE:
            f.duplicate(step)
        elif kind == LOST_MESSAGE:
            f.lose_message(step)
        elif kind == CRASH_AFTER_COMPENSATION:
            # Roll back from a step that comes after this one (it fails without an
            # effect), or, for the last step, from this step failing after its change.
            f.crash(step, at="after_body", phase="compensate")
            later = [n for n in self.task_steps if step in self.saga.graph.ancestors[n]]
            if later:
                self._fail(env, later[-1])
            else:
                f.fail_after_body(step)

    def _fail(self, env: SagaEnv, step: str) -> None:
        env.mock(
            self.saga.graph.steps[step].task_name or step,
            raises=StepResponse.permanent_failure(f"{step} failed permanently (injected)"),
        )

    def _check(self, env: SagaEnv, sc: Scenario, step: str, kind: str) -> None:
        state = env.store.read_state(self.saga_id)
        assert state is not None
        status = state.saga.status
        if status not in SAGA_TERMINAL:
            sc.violations.append(f"the saga did not end: it is {status.value}")
        graph = self.saga.graph
        events = env.store.history(self.saga_id)
        runs = [r for r in env.body_runs if r.saga_id == self.saga_id]
        applied = {r.step for r in runs if r.phase is Phase.FORWARD and r.applied}
        done = [str(e.step) for e in events if e.kind == EventKind.COMPENSATION_SUCCEEDED]
        for name in graph.order:
            spec = graph.steps[name]
            times = done.count(name)
            if (
                name in applied
                and spec.compensable
                and status is not SagaStatus.COMPLETED
                and times != 1
            ):
                sc.violations.append(
                    f"step {name!r} applied and was compensated {times} "
                    f"times (expected exactly once)"
                )
            if status is SagaStatus.COMPLETED and times:
                sc.violations.append(f"the saga completed, yet step {name!r} was compensated")
            if name not in applied and (
                times or any(r.step == name and r.phase is Phase.COMPENSATE for r in runs)
            ):
                sc.violations.append(
                    f"the compensation of step {name!r} ran, but the step itself never applied"
                )
            forward = [r for r in runs if r.step == name and r.phase is Phase.FORWARD]
            keys = {r.idempotency_key for r in forward}
            if len(keys) > 1:
                sc.violations.append(
                    f"step {name!r} ran under several idempotency keys: {sorted(keys)}"
                )
            crashes = sum(1 for r in forward if r.outcome == "crashed")
            ran = sum(1 for r in forward if r.applied)
            if ran > 1 + crashes:
                sc.violations.append(
                    f"step {name!r} applied {ran} times with only "
                    f"{crashes} crash(es): something ran twice"
                )
        first_start: dict[str, int] = {}
        for i, e in enumerate(events):
            if e.kind == EventKind.COMPENSATION_STARTED:
                first_start.setdefault(str(e.step), i)
        finished = {
            str(e.step): i
            for i, e in enumerate(events)
            if e.kind == EventKind.COMPENSATION_SUCCEEDED
        }
        for later in finished:
            for earlier in graph.ancestors[later]:
                if earlier in first_start and first_start[earlier] < finished[later]:
                    sc.violations.append(
                        f"step {earlier!r} was compensated before step {later!r}, which "
                        f"depends on it, was undone (reverse dependency order broken)"
                    )

    def _check_world(self, sc: Scenario, before: Any, after: Any) -> None:
        if sc.status == SagaStatus.COMPLETED.value:
            if not sc.step:
                self.completed_world = after
                return
            expected, what = self.completed_world, "after the run without faults"
        elif sc.status == SagaStatus.COMPENSATED.value:
            expected, what = before, "before the saga (the rollback left a change behind)"
        else:
            return
        if after != expected:
            sc.violations.append(f"the world differs from {what}: {_diff(expected, after)}")


def _diff(expected: Any, actual: Any) -> str:
    if isinstance(expected, dict) and isinstance(actual, dict):
        keys = sorted(set(expected) | set(actual), key=str)
        parts = [
            f"{k}: {expected.get(k, '<absent>')!r} -> {actual.get(k, '<absent>')!r}"
            for k in keys
            if expected.get(k) != actual.get(k)
        ]
        return "; ".join(parts)[:500]
    return f"{expected!r} -> {actual!r}"[:500]
