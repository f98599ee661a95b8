"""The Celery app that the chaos tests run in real worker processes (and kill).

Broker from CELERY_BROKER_URL, state store from SAGALINE_STORE_URL, and the
settings (lease, redispatch_after, sweep_interval) from SAGALINE_* through
`sagaline.init_app`. Steps and compensations act on a ledger in the PostgreSQL
database of LEDGER_URL the way a real service would: the effect is written
idempotently, keyed by `sagaline.current_step().idempotency_key` (INSERT ...
ON CONFLICT DO NOTHING), and every execution of a body is also appended to
`chaos_executions` (no uniqueness), so that tests count duplicate executions.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import psycopg
from celery import Celery

import sagaline
from sagaline import Saga

# Without a broker in the environment (the test process imports this module for the
# saga definition only) use kombu's in-memory transport: nothing is created on disk.
app = Celery("chaos_app", broker=os.environ.get("CELERY_BROKER_URL") or "memory://")
app.conf.update(broker_connection_retry_on_startup=True, worker_prefetch_multiplier=1)
if os.environ.get("SAGALINE_TEST_QUEUE_TYPE"):  # "quorum" on RabbitMQ
    app.conf.task_default_queue_type = os.environ["SAGALINE_TEST_QUEUE_TYPE"]
sagaline.init_app(app)

LEDGER_DDL = """
CREATE TABLE IF NOT EXISTS chaos_ledger (
    key text PRIMARY KEY,
    saga_id text NOT NULL,
    step text NOT NULL,
    action text NOT NULL,
    attempt int NOT NULL,
    pid int NOT NULL,
    ts double precision NOT NULL
);
CREATE TABLE IF NOT EXISTS chaos_executions (
    id bigserial PRIMARY KEY,
    saga_id text NOT NULL,
    step text NOT NULL,
    phase text NOT NULL,
    attempt int NOT NULL,
    pid int NOT NULL,
    ts double precision NOT NULL
);
CREATE INDEX IF NOT EXISTS chaos_executions_saga ON chaos_executions (saga_id);
CREATE INDEX IF NOT EXISTS chaos_ledger_saga ON chaos_ledger (saga_id);
"""

_local = threading.local()


def ledger_dsn() -> str:
    return os.environ["LEDGER_URL"].replace("postgresql+psycopg://", "postgresql://", 1)


def _connection() -> psycopg.Connection[Any]:
    """One autocommit connection per process (and thread), re-opened when it broke."""
    conn = getattr(_local, "conn", None)
    if conn is None or conn.closed or getattr(_local, "pid", None) != os.getpid():
        conn = psycopg.connect(ledger_dsn(), autocommit=True, connect_timeout=10)
        _local.conn, _local.pid = conn, os.getpid()
    return conn


def _execute(sql: str, params: tuple[Any, ...]) -> None:
    for attempt in range(3):
        try:
            _connection().execute(sql, params)
            return
        except psycopg.OperationalError:
            _local.conn = None
            if attempt == 2:
                raise
            time.sleep(0.2)


def executed(phase: str) -> sagaline.StepInfo:
    """Append this execution of a body to chaos_executions; return the step info."""
    info = sagaline.current_step()
    _execute(
        "INSERT INTO chaos_executions (saga_id, step, phase, attempt, pid, ts) "
        "VALUES (%s, %s, %s, %s, %s, %s)",
        (info.saga_id, info.step, phase, info.attempt, os.getpid(), time.time()),
    )
    return info


def apply_effect(info: sagaline.StepInfo) -> None:
    """The step's effect on the outside world, idempotent by its idempotency key."""
    _execute(
        "INSERT INTO chaos_ledger (key, saga_id, step, action, attempt, pid, ts) "
        "VALUES (%s, %s, %s, 'do', %s, %s, %s) ON CONFLICT (key) DO NOTHING",
        (info.idempotency_key, info.saga_id, info.step, info.attempt, os.getpid(), time.time()),
    )


def undo_effect(info: sagaline.StepInfo) -> None:
    """Undo the step's effect if it was applied (a compensation may be asked to undo an
    attempt whose outcome is unknown), idempotent by the compensation's own key."""
    _execute(
        "INSERT INTO chaos_ledger (key, saga_id, step, action, attempt, pid, ts) "
        "SELECT %s, %s, %s, 'undo', %s, %s, %s WHERE EXISTS "
        "(SELECT 1 FROM chaos_ledger WHERE key = %s AND action = 'do') "
        "ON CONFLICT (key) DO NOTHING",
        (
            info.idempotency_key,
            info.saga_id,
            info.step,
            info.attempt,
            os.getpid(),
            time.time(),
            f"{info.saga_id}:{info.step}",
        ),
    )


@app.task(name="chaos.work")
def work(durations: dict[str, float], fail: str | None = None) -> dict[str, Any]:
    """A step that takes durations[step] seconds; its effect lands half-way through."""
    info = executed("forward")
    half = durations[info.step] / 2
    time.sleep(half)
    if fail == info.step:
        raise RuntimeError(f"{info.step} failed on purpose")
    apply_effect(info)
    time.sleep(half)
    return {f"{info.step}_done": True}


@app.task(name="chaos.undo")
def undo(durations: dict[str, float], compensation_data: Any = None) -> None:
    info = executed("compensate")
    half = durations.get("undo", 0.05) / 2
    time.sleep(half)
    undo_effect(info)
    time.sleep(half)


# The failing step is always the last one: in half of the sagas it fails after half of
# its duration, so that the saga compensates, sometimes with a sibling still running.

# a and b in parallel (the 200-saga test: two steps keep it inside its time budget).
pair = (
    Saga("chaos_pair")
    .add_step(work, name="a", compensate=undo)
    .add_step(work, name="b", compensate=undo, depends_on=[])
)

# a, then b and c in parallel.
fork = (
    Saga("chaos_fork")
    .add_step(work, name="a", compensate=undo)
    .add_step(work, name="b", compensate=undo, depends_on=["a"])
    .add_step(work, name="c", compensate=undo, depends_on=["a"])
)

# a, then b and c in parallel, then d (the rolling-restart test: four steps, and an
# undo of a that must wait for the undos of both b and c).
diamond = (
    Saga("chaos_diamond")
    .add_step(work, name="a", compensate=undo)
    .add_step(work, name="b", compensate=undo, depends_on=["a"])
    .add_step(work, name="c", compensate=undo, depends_on=["a"])
    .add_step(work, name="d", compensate=undo, depends_on=["b", "c"])
)


# -- pauses at the two moments a kill must not lose a step (test_worker_loss.py) -------
#
# CHAOS_PAUSE="<where>:<step>" makes the first pool process that handles step <step>
# write its pid to CHAOS_PAUSE_FILE and sleep there for 60 s, so that a test kills it
# at that moment:
# - "before_claim": Celery has handed the message to the pool process (and would have
#   acknowledged it by default), sagaline has not claimed the step yet;
# - "before_publish": the step's completion is committed, the messages of the steps it
#   dispatched are not published yet.

_PAUSE = os.environ.get("CHAOS_PAUSE", "")


def _pause(where: str, step: str | None) -> None:
    """Pause once per CHAOS_PAUSE_FILE: the process that creates it pauses, no other."""
    if f"{where}:{step}" != _PAUSE:
        return
    try:
        fd = os.open(os.environ["CHAOS_PAUSE_FILE"], os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    time.sleep(60)


if _PAUSE.startswith("before_claim:"):
    from celery.signals import task_prerun

    @task_prerun.connect(weak=False)
    def _pause_before_claim(task: Any = None, **_: Any) -> None:
        meta = getattr(task.request, "sagaline", None) or {}
        _pause("before_claim", meta.get("step"))


if _PAUSE.startswith("before_publish:"):
    from sagaline.runtime import Runtime

    _publish = Runtime.publish

    def _publish_after_a_pause(self: Runtime, dispatches: list[Any]) -> None:
        try:
            current: sagaline.StepInfo | None = sagaline.current_step()
        except RuntimeError:  # not inside a step: the sweeper, a client
            current = None
        if dispatches and current is not None and current.phase == "forward":
            _pause("before_publish", current.step)
        _publish(self, dispatches)

    Runtime.publish = _publish_after_a_pause  # type: ignore[method-assign]
