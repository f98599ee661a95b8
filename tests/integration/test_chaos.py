"""Chaos: sagas on real prefork workers while workers, the broker or the store crash.

Every test runs sagas of `chaos_app` (test 1: `pair`, a and b in parallel; tests
2 and 3: `fork`, a then b and c in parallel); in half of them the last step fails
so that they compensate. They run on two `-P prefork -c 2` workers and break
something mid-run:

1. every worker process (main processes and pool children) is killed with
   SIGKILL twice, at seeded random moments, and restarted under the same node
   names, with sagaline's DEFAULT settings (a 60 s lease, redispatch_after
   30 s): the restarted workers hand back what their predecessors were running
   and put back the step messages they held (a step's message is acknowledged
   once the step ended), so no step waits for the lease or for the sweeper.
   Every saga must be terminal within WORKERS_SETTLE (15 s) of the last
   restart, except one waiting only for messages that kombu's Redis transport
   lost with a killed worker (popped, not yet recorded as unacknowledged: at
   most one per worker and kill), which the sweeper must publish again within
   redispatch_after more. Every step RUNNING at a kill must start again (or
   have its retry cancelled by its saga's rollback) within RUNS_AGAIN_WITHIN
   (10 s) of the restart before it did; the summary lines report both figures;
2. the broker (a private redis-server without persistence) is stopped for 2 s:
   every queued message is lost, the sweeper publishes DISPATCHED steps again;
3. the store (a private PostgreSQL cluster, or a private redis-server with
   appendonly for the Redis store) is stopped for 2 s and restarted on its port;
4. (aimed) the workers are killed while a saga rolls back and a sibling step that
   already applied its effect is still running: that step must be undone too.

Tests 1 and 3 run once with the SQL store on PostgreSQL ("postgres") and once
with the Redis store on its own private redis-server with `appendonly yes`
("redis"), separate from the broker's.

Tests 2 to 4 run with SAGALINE_LEASE=5, SAGALINE_REDISPATCH_AFTER=5 and
SAGALINE_SWEEP_INTERVAL=1, and every saga must reach a terminal state within
lease + 30 s of the last restart. In every test the ledger that steps write
(idempotently, by the step's idempotency key) must show, per saga, either every
step applied and none undone (COMPLETED), or every applied step undone exactly
once, after the steps that depend on it, and nothing left applied (COMPENSATED).
Duplicate executions of step bodies are counted from an append-only table,
printed (run pytest with -s), and allowed only for steps whose attempt was cut
short by a crash (RUNNING when the workers were killed, and failed afterwards
with `lease_expired` or `worker_lost` in the saga history).

Seed: CHAOS_SEED (default below) drives the kill moments and step durations.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
import sqlalchemy as sa
from celery import Celery

import sagaline
from sagaline import SagaStatus
from sagaline.records import HEADER, SagaFilter
from sagaline.runtime import Runtime
from sagaline.states import SAGA_TERMINAL, CompensationStatus, StepStatus
from sagaline.stores.schema import events as events_table
from sagaline.stores.schema import sagas as sagas_table
from sagaline.stores.schema import steps as steps_table
from tests.harness import (
    PrivatePostgres,
    PrivateRedis,
    WorkerProcess,
    drop_database,
    pid_alive,
    shared_postgres_url,
    wait_until,
)
from tests.integration import chaos_app

pytestmark = pytest.mark.chaos

APP = "tests.integration.chaos_app"
LEASE = 5.0
REDISPATCH_AFTER = 5.0
SWEEP_INTERVAL = 1.0
SETTLE = LEASE + 30.0  # every saga is terminal this long after the last restart
# The same after killed workers restart, on default settings (issue 9's bound): no
# step waits for the lease or for the sweeper's redispatch_after.
WORKERS_SETTLE = 15.0
# A step RUNNING at a kill starts again (or its saga undoes it) this soon after the
# restart that followed (the last restart before it ran again).
RUNS_AGAIN_WITHIN = 10.0
CRASHED = ("lease_expired", "worker_lost")  # reasons of attempts cut short by a crash
SEED = int(os.environ.get("CHAOS_SEED", "20240611"))


# -- the cluster under test ------------------------------------------------------------


@dataclass
class Kill:
    """One SIGKILL of every worker process, and what the store said was running then."""

    at: float  # seconds since the sagas were started
    killed: float  # wall-clock time of the kill
    pids: list[int]
    running: set[tuple[str, str, str]]  # (saga_id, step, phase) RUNNING when killed
    restarted: float | None = None  # wall-clock time the workers were ready again


@dataclass
class Cluster:
    broker_url: str
    store_url: str
    ledger_url: str
    tmp: Path
    runtime: Runtime = field(init=False)
    saga: sagaline.Saga = chaos_app.fork
    workers: list[WorkerProcess] = field(default_factory=list)  # every one ever started
    live: list[WorkerProcess] = field(default_factory=list)
    saga_ids: list[str] = field(default_factory=list)  # every saga started
    # sagaline's defaults (lease 60 s, ...) instead of the short timings above.
    default_settings: bool = False
    settle_for: float = SETTLE
    concurrency: int = 2  # pool processes per worker
    # Longer than the queue's backlog lasts, or the sweeper publishes waiting steps again.
    redispatch_after: float = REDISPATCH_AFTER

    def __post_init__(self) -> None:
        with psycopg.connect(self.ledger_dsn, autocommit=True) as conn:
            conn.execute(chaos_app.LEDGER_DDL)
        client = Celery(f"chaos-client-{uuid.uuid4().hex[:6]}")
        client.conf.broker_url = self.broker_url
        # The client writes the root steps' due times: it shares the workers' settings.
        timings = (
            {}
            if self.default_settings
            else {"lease": LEASE, "redispatch_after": self.redispatch_after}
        )
        self.runtime = sagaline.init_app(client, store=self.store_url, sweeper=False, **timings)
        self.runtime.store.count_by_status()  # creates the schema before workers start

    @property
    def ledger_dsn(self) -> str:
        return self.ledger_url.replace("postgresql+psycopg://", "postgresql://", 1)

    @property
    def env(self) -> dict[str, str]:
        return {
            "CELERY_BROKER_URL": self.broker_url,
            "SAGALINE_STORE_URL": self.store_url,
            "LEDGER_URL": self.ledger_url,
            # An empty value means the default, whatever the caller's environment says.
            "SAGALINE_LEASE": "" if self.default_settings else str(LEASE),
            "SAGALINE_REDISPATCH_AFTER": (
                "" if self.default_settings else str(self.redispatch_after)
            ),
            "SAGALINE_SWEEP_INTERVAL": "" if self.default_settings else str(SWEEP_INTERVAL),
            "SAGALINE_CRASH_RETRIES": "",
        }

    def start_workers(self, n: int = 2, *, names: list[str] | None = None) -> None:
        """Start `n` workers (or one per node name in `names`) at once, in threads, and
        wait until all are ready."""
        new = []
        for name in names or [f"chaos{i}-{uuid.uuid4().hex[:6]}" for i in range(n)]:
            w = WorkerProcess(
                APP,
                # Each node its own SAGALINE_HOME (its liveness heartbeat file), kept
                # across restarts under the same node name.
                env={**self.env, "SAGALINE_HOME": str(self.tmp / "home" / name)},
                concurrency=self.concurrency,
                name=name,
                workdir=self.tmp / f"worker{len(self.workers)}",
            )
            self.workers.append(w)
            new.append(w)
        errors: list[BaseException] = []

        def start(w: WorkerProcess) -> None:
            try:
                w.start()
            except BaseException as exc:  # reported below, in the test's thread
                errors.append(exc)

        threads = [threading.Thread(target=start, args=(w,)) for w in new]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        if errors:
            raise errors[0]
        self.live += new

    def kill_workers(self, t0: float, only: list[WorkerProcess] | None = None) -> Kill:
        """SIGKILL every process of every live worker (or of those `only`) at once; read
        what they were RUNNING."""
        victims = self.live if only is None else only
        pids: list[int] = []
        for w in victims:
            pids += [w.pid, *w.child_pids()]
        for w in victims:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(w.pid, signal.SIGKILL)  # the worker's own process group
        at, killed = time.monotonic() - t0, time.time()
        for w in victims:
            w.kill()  # waits until the whole group is gone
        assert not [p for p in pids if pid_alive(p)], "a worker process survived SIGKILL"
        self.live = [w for w in self.live if w not in victims]
        # No process of theirs is left to change the store, and the workers still alive
        # hand back only their own nodes' claims: this is exactly what the kill cut short.
        nodes = None if only is None else [w.name for w in victims]
        return Kill(at, killed, pids, self.running_steps(nodes))

    @property
    def sql(self) -> bool:
        """True for the SQL store (read with SQL); otherwise read through the Store API."""
        return hasattr(self.runtime.store, "engine")

    def running_steps(self, nodes: list[str] | None = None) -> set[tuple[str, str, str]]:
        """(saga_id, step, phase) RUNNING now; with `nodes`, only claims of those workers."""

        def of_nodes(owner_node: str | None) -> bool:
            return nodes is None or (owner_node or "").split("@", 1)[0] in nodes

        if not self.sql:
            found = set()
            for saga_id in self.saga_ids:
                for st in self.runtime.store.get_steps(saga_id):
                    if not of_nodes(st.owner_node):
                        continue
                    if st.status is StepStatus.RUNNING:
                        found.add((saga_id, st.name, "forward"))
                    elif st.comp_status is CompensationStatus.RUNNING:
                        found.add((saga_id, st.name, "compensate"))
            return found
        s = steps_table
        with self.runtime.store.engine.connect() as conn:
            rows = conn.execute(
                sa.select(s.c.saga_id, s.c.name, s.c.status, s.c.comp_status, s.c.owner_node).where(
                    sa.or_(s.c.status == "RUNNING", s.c.comp_status == "RUNNING")
                )
            ).all()
        return {
            (r.saga_id, r.name, "forward" if r.status == "RUNNING" else "compensate")
            for r in rows
            if of_nodes(r.owner_node)
        }

    @property
    def steps(self) -> tuple[str, ...]:
        return tuple(self.saga.graph.order)

    @property
    def failing_step(self) -> str:
        return self.steps[-1]

    def start_sagas(
        self,
        n: int,
        rng: random.Random,
        *,
        all_fail: bool = False,
        durations: dict[str, float] | None = None,
    ) -> dict[str, bool]:
        """Start n sagas, every other one failing at its last step: {saga_id: fails}.

        Steps take 50-300 ms and compensations 20-100 ms (seeded), unless `durations`.
        """
        started: dict[str, bool] = {}
        for i in range(n):
            fails = all_fail or i % 2 == 1
            if durations is None:
                durations_i = {s: round(rng.uniform(0.05, 0.3), 3) for s in self.steps}
                durations_i["undo"] = round(rng.uniform(0.02, 0.1), 3)
            else:
                durations_i = dict(durations)
            handle = self.runtime.start_saga(
                self.saga,
                {"n": i, "durations": durations_i, "fail": self.failing_step if fails else None},
            )
            started[handle.saga_id] = fails
            self.saga_ids.append(handle.saga_id)
        return started

    def not_terminal(self) -> int:
        counts = self.runtime.store.count_by_status(self.saga.name)
        return sum(v for k, v in counts.items() if k not in SAGA_TERMINAL)

    def wait_all_terminal(self, deadline: float) -> None:
        for _ in range(int(self.settle_for * 4) + 400):
            if self.not_terminal() == 0 or time.monotonic() >= deadline:
                break
            time.sleep(0.25)

    def redispatches(self) -> int:
        kinds = {"step_redispatched", "compensation_redispatched"}
        if not self.sql:
            return sum(
                1
                for saga_id in self.saga_ids
                for ev in self.runtime.store.history(saga_id)
                if ev.kind in kinds
            )
        e = events_table
        with self.runtime.store.engine.connect() as conn:
            return int(
                conn.execute(
                    sa.select(sa.func.count()).where(
                        e.c.kind.in_(["step_redispatched", "compensation_redispatched"])
                    )
                ).scalar_one()
            )

    def log_errors(self) -> list[str]:
        """Tracebacks the workers logged (other than the on-purpose failures)."""
        found = []
        for w in self.workers:
            for line in w.log_text().splitlines():
                if ("ERROR" in line or "CRITICAL" in line) and "failed on purpose" not in line:
                    found.append(f"{w.name}: {line[:300]}")
        return found

    def stuck_ids(self) -> list[str]:
        """Ids of the sagas not terminal yet."""
        if not self.sql:
            active = [st for st in SagaStatus if st not in SAGA_TERMINAL]
            return [
                r.saga_id
                for r in self.runtime.store.list_sagas(
                    SagaFilter(status=active, name=self.saga.name, limit=len(self.saga_ids))
                )
            ]
        with self.runtime.store.engine.connect() as conn:
            return [
                r.saga_id
                for r in conn.execute(
                    sa.select(sagas_table.c.saga_id).where(
                        sagas_table.c.status.not_in([s.value for s in SAGA_TERMINAL])
                    )
                )
            ]

    def broker_copies(self, saga_id: str) -> list[tuple[str, str, str]]:
        """The messages of `saga_id`'s steps that the broker holds: (where, step, phase),
        where is the queue, or "unacked" for one a worker took and has not acknowledged."""
        client = redis.Redis.from_url(self.broker_url)
        found: list[tuple[str, str, str]] = []
        try:
            # (where, the message): kombu keeps an unacknowledged one as
            # [message, exchange, routing key].
            held: list[tuple[str, Any]] = []
            for key in client.scan_iter(count=1000):
                name = key.decode(errors="replace")
                kind = client.type(key)
                if kind == b"list":
                    held += [(name, m) for m in client.lrange(key, 0, 100_000)]
                elif kind == b"hash" and name == "unacked":
                    held += [(name, m) for m in client.hvals(key)]
            for where, raw in held:
                with contextlib.suppress(ValueError, TypeError, AttributeError, IndexError):
                    message = json.loads(raw)
                    message = message[0] if where == "unacked" else message
                    meta = (message.get("headers") or {}).get(HEADER) or {}
                    if meta.get("saga_id") == saga_id:
                        found.append((where, str(meta.get("step")), str(meta.get("phase"))))
        finally:
            client.close()
        return found

    def lost_messages(self, saga_id: str) -> list[tuple[str, str]]:
        """The (step, phase) of `saga_id` that wait for a message (DISPATCHED) which the
        broker no longer holds, in a queue or unacknowledged."""
        view = sagaline.get_saga(saga_id, runtime=self.runtime)
        waiting = [(s.name, "forward") for s in view.steps if s.status is StepStatus.DISPATCHED]
        waiting += [
            (s.name, "compensate")
            for s in view.steps
            if s.comp_status is CompensationStatus.DISPATCHED
        ]
        held = {(step, phase) for _, step, phase in self.broker_copies(saga_id)}
        return [w for w in waiting if w not in held]

    def close(self) -> None:
        for w in self.workers:
            w.kill()
        self.live = []
        self.runtime.store.close()


_config: pytest.Config | None = None


def say(line: str) -> None:
    """Print a line of the chaos summary where CI output shows it (pytest's terminal)."""
    if _config is None:
        print(line)
        return
    terminal = _config.pluginmanager.getplugin("terminalreporter")
    capture = _config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        terminal.write_line(line.lstrip("\n"))


@pytest.fixture(autouse=True)
def _report_in_the_test_output(request: pytest.FixtureRequest) -> Iterator[None]:
    """The chaos summary (kills, settle time, duplicate executions) is part of the result:
    it goes to the test output in every run, not only when a test fails."""
    global _config
    _config = request.config
    try:
        yield
    finally:
        _config = None


@pytest.fixture
def shared_db() -> Iterator[str]:
    """A fresh database on the shared PostgreSQL (never restarted), dropped afterwards."""
    url = shared_postgres_url(f"sagaline_chaos_{uuid.uuid4().hex[:10]}")
    try:
        yield url
    finally:
        drop_database(url)


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    redis = PrivateRedis()
    try:
        yield redis
    finally:
        redis.destroy()


@pytest.fixture(params=["postgres", "redis"])
def store_kind(request: pytest.FixtureRequest) -> str:
    """The state store under test: the SQL store on PostgreSQL, or the Redis store."""
    return str(request.param)


@pytest.fixture
def store_redis() -> Iterator[PrivateRedis]:
    """The Redis store's own private redis-server (not the broker's), with appendonly
    (appendfsync always): what it acknowledged survives a stop and restart."""
    redis = PrivateRedis(appendonly=True)
    try:
        yield redis
    finally:
        redis.destroy()


# -- checking the outcome ----------------------------------------------------------------


def history_text(cluster: Cluster, saga_id: str) -> str:
    view = sagaline.get_saga(saga_id, runtime=cluster.runtime)
    t0 = view.history[0].ts if view.history else 0.0
    lines = [f"saga {saga_id} {view.status.value} input={view.saga.input}"]
    for s in view.steps:
        lines.append(
            f"  step {s.name}: {s.status.value} attempt={s.attempt} "
            f"comp={s.comp_status.value if s.comp_status else None} "
            f"comp_attempt={s.comp_attempt}"
        )
    for e in view.history:
        detail = {
            k: (v.split("\n", 1)[0] if isinstance(v, str) else v)
            for k, v in e.detail.items()
            if v is not None
        }
        lines.append(
            f"  +{e.ts - t0:7.3f} {e.kind:28} {e.step or '':2} a={e.attempt} "
            f"{e.phase or ''} {detail}"
        )
    return "\n".join(lines)


def check_outcome(
    cluster: Cluster, started: dict[str, bool], kills: list[Kill], label: str, unsettled: str = ""
) -> int:
    """Assert the consistency of every saga; print and return the duplicate executions.

    `unsettled` (from settle()) fails the test too, after every other check ran.
    """
    # The sagas first, the ledger after: a saga seen terminal has all its effects in it.
    views = {sid: sagaline.get_saga(sid, runtime=cluster.runtime) for sid in started}
    with psycopg.connect(cluster.ledger_dsn) as conn:
        ledger = conn.execute("SELECT saga_id, step, action, ts FROM chaos_ledger").fetchall()
        execs = conn.execute(
            "SELECT saga_id, step, phase, attempt FROM chaos_executions"
        ).fetchall()
    done: dict[str, dict[str, float]] = defaultdict(dict)
    undone: dict[str, dict[str, float]] = defaultdict(dict)
    for saga_id, step, action, ts in ledger:
        (done if action == "do" else undone)[saga_id][step] = ts
    runs = Counter((saga_id, step, phase) for saga_id, step, phase, _ in execs)

    problems: list[str] = []
    statuses: Counter[str] = Counter()
    lease_expired: set[tuple[str, str, str]] = set()
    for saga_id, fails in started.items():
        view = views[saga_id]
        statuses[view.status.value] += 1
        for e in view.history:
            if e.detail.get("reason") in CRASHED and e.step:
                lease_expired.add((saga_id, e.step, e.phase or ""))
        did, undid = done[saga_id], undone[saga_id]
        why: list[str] = []
        if fails:
            if view.status is not SagaStatus.COMPENSATED:
                why.append(f"status {view.status.value}, expected COMPENSATED")
            if cluster.failing_step in did:
                why.append(f"the failing step {cluster.failing_step} has an effect")
            if set(undid) != set(did):
                why.append(f"applied {sorted(did)} but undone {sorted(undid)}")
            for step in undid:
                if step in did and undid[step] < did[step]:
                    why.append(f"{step} undone before it was applied")
                # Reverse order: a step is undone only after every step that depends on it.
                for later in cluster.saga.graph.dependents[step]:
                    if later in undid and undid[later] > undid[step]:
                        why.append(f"{step} undone before {later}, which depends on it")
            comp_ok = Counter(e.step for e in view.history if e.kind == "compensation_succeeded")
            for step in did:
                if comp_ok[step] != 1:
                    why.append(f"{step} compensated {comp_ok[step]} times in the history")
        else:
            if view.status is not SagaStatus.COMPLETED:
                why.append(f"status {view.status.value}, expected COMPLETED")
            if set(did) != set(cluster.steps) or undid:
                why.append(f"applied {sorted(did)}, undone {sorted(undid)}")
        # Every step body that ran must be accounted for: applied, or it failed on purpose.
        for (sid, step, phase), _n in runs.items():
            if (
                sid == saga_id
                and phase == "forward"
                and step not in did
                and step != cluster.failing_step
                and view.status is SagaStatus.COMPLETED
            ):
                why.append(f"{step} ran but left no effect in a completed saga")
        if why:
            problems.append("; ".join(why) + "\n" + history_text(cluster, saga_id))

    duplicates = {k: n - 1 for k, n in runs.items() if n > 1}
    running_at_kills = [k.running for k in kills]
    cut_short = set().union(*running_at_kills) if running_at_kills else set()
    total = sum(duplicates.values())
    say(f"\n[{label}] seed={SEED} sagas={len(started)} statuses={dict(statuses)}")
    for i, k in enumerate(kills, 1):
        say(
            f"[{label}] kill {i} at +{k.at:.2f}s: {len(k.pids)} processes, "
            f"{len(k.running)} steps RUNNING"
        )
    say(
        f"[{label}] executions={len(execs)} duplicate step executions={total} "
        f"(on {len(duplicates)} steps; steps RUNNING at kills="
        f"{sum(len(r) for r in running_at_kills)}; crashed attempts in history="
        f"{len(lease_expired)}; messages published again by the sweeper="
        f"{cluster.redispatches()})"
    )
    delays = rerun_delays(views, kills)
    if delays:
        say(
            f"[{label}] steps cut short by a kill ran again (or were cancelled by a rollback) "
            f"{delays[0][0]:.1f}s at most after their workers restarted (median "
            f"{delays[len(delays) // 2][0]:.1f}s, {len(delays)} steps; bound "
            f"{RUNS_AGAIN_WITHIN:.0f}s)"
        )
        for took, saga_id, step in delays:
            if took >= RUNS_AGAIN_WITHIN:
                problems.insert(
                    0,
                    f"saga {saga_id} step {step} ran again {took:.1f}s after "
                    f"the restart\n{history_text(cluster, saga_id)}",
                )
    for key, n in sorted(duplicates.items()):
        say(f"[{label}]   duplicate x{n}: saga {key[0]} step {key[1]} {key[2]}")

    for key in duplicates:
        if key not in lease_expired:
            problems.append(
                f"{key} ran {duplicates[key] + 1} times without a crashed attempt "
                f"(lease_expired or worker_lost) in its history\n"
                f"{history_text(cluster, key[0])}"
            )
        if kills and key not in cut_short:
            problems.append(
                f"{key} ran {duplicates[key] + 1} times but was not RUNNING at "
                f"any kill\n{history_text(cluster, key[0])}"
            )
    if kills and total > sum(len(r) for r in running_at_kills):
        problems.append(
            f"{total} duplicate executions but only "
            f"{sum(len(r) for r in running_at_kills)} steps were RUNNING at kills"
        )
    for p in problems:
        say(f"[{label}] PROBLEM: {p.splitlines()[0]}")
    if problems or unsettled:
        pytest.fail(
            f"{unsettled}\n{len(problems)} inconsistent sagas:\n" + "\n\n".join(problems[:8]),
            pytrace=False,
        )
    return total


def rerun_delays(
    views: dict[str, sagaline.SagaView], kills: list[Kill]
) -> list[tuple[float, str, str]]:
    """Per step RUNNING at a kill: seconds from the restart that followed to its
    recovery: the next start of that step (or of its compensation, for a compensation
    cut short), or, if its saga began rolling back meanwhile, the cancel of its retry
    (its compensation then waits in the queue like every other saga's). If the workers
    were killed again before that, from the last restart before it. With the saga and
    the step, largest first."""
    restarts = sorted(k.restarted for k in kills if k.restarted is not None)
    delays = []
    for kill in kills:
        if kill.restarted is None:
            continue
        for saga_id, step, _phase in kill.running:
            starts = [
                e.ts
                for e in views[saga_id].history
                if e.step == step
                and e.kind in ("step_started", "compensation_started", "step_cancelled")
                and e.ts > kill.killed
            ]
            if starts:
                # Before the restart returned (one worker was ready before the other): 0.
                start = min(starts)
                since = [r for r in restarts if kill.killed < r <= start]
                delays.append((start - max(since) if since else 0.0, saga_id, step))
    return sorted(delays, reverse=True)


def settle(cluster: Cluster, last_restart: float, label: str, *, lost_at_most: int = 0) -> str:
    """Wait until every saga is terminal (bounded); if some are not, explain which.

    `lost_at_most`: how many step messages the broker may have lost (kombu's Redis
    transport pops a message with BRPOP and records it as unacknowledged only once it
    read the reply: a worker killed in between takes it with it, at most one per
    worker). Sagas waiting only for such messages get the sweeper's bound instead:
    terminal within redispatch_after of the bound above, each through a redispatch."""
    deadline = last_restart + cluster.settle_for
    cluster.wait_all_terminal(deadline)
    lost: dict[str, list[tuple[str, str]]] = {}
    if lost_at_most and cluster.not_terminal():
        lost = {i: cluster.lost_messages(i) for i in cluster.stuck_ids()}
        count = sum(len(v) for v in lost.values())
        if all(lost.values()) and count <= lost_at_most:
            say(
                f"[{label}] {len(lost)} sagas wait for {count} step messages the broker lost "
                f"with a killed worker ({lost}): the sweeper publishes them again"
            )
            cluster.wait_all_terminal(deadline + cluster.runtime.settings.redispatch_after)
        else:
            lost = {}
    took = time.monotonic() - last_restart
    stuck = cluster.not_terminal()
    lease = cluster.runtime.settings.lease
    say(
        f"[{label}] all terminal {took:.1f}s after the last restart (bound "
        f"{cluster.settle_for:.0f}s, lease {lease:.0f}s)"
        if not stuck
        else f"[{label}] {stuck} sagas not terminal {took:.1f}s after the last restart"
    )
    unredispatched = [
        i
        for i in lost
        if not any(
            e.kind in ("step_redispatched", "compensation_redispatched")
            for e in sagaline.get_saga(i, runtime=cluster.runtime).history
        )
    ]
    if stuck or unredispatched:
        ids = cluster.stuck_ids() or unredispatched
        shown = "\n\n".join(
            f"{history_text(cluster, i)}\n  in the broker: "
            f"{cluster.broker_copies(i) or 'no message of this saga'}"
            for i in ids[:5]
        )
        errors = "\n".join(cluster.log_errors()[-20:])
        return (
            f"[{label}] {stuck} sagas not terminal {cluster.settle_for:.0f}s after the last "
            f"restart ({len(lost)} waited for lost messages, {len(unredispatched)} of them "
            f"ended without a redispatch):\n{shown}\n--- worker errors ---\n{errors}"
        )
    return ""


# -- the tests ---------------------------------------------------------------------------


def test_workers_killed_twice_mid_run(
    store_kind: str,
    private_redis: PrivateRedis,
    shared_db: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    rng = random.Random(SEED)
    if store_kind == "redis":
        store_url = request.getfixturevalue("store_redis").url
        label = "workers/redis"
    else:
        store_url, label = shared_db, "workers"
    cluster = Cluster(
        private_redis.url,
        store_url,
        shared_db,
        tmp_path,
        saga=chaos_app.pair,
        default_settings=True,
        settle_for=WORKERS_SETTLE,
    )
    try:
        cluster.start_workers()
        assert cluster.runtime.settings.lease == 60.0
        names = [w.name for w in cluster.live]
        started = cluster.start_sagas(200, rng)
        t0 = time.monotonic()
        kills: list[Kill] = []
        for _ in range(2):
            time.sleep(rng.uniform(2.0, 6.0))
            kills.append(cluster.kill_workers(t0))
            cluster.start_workers(names=names)  # a restart: the same node names
            kills[-1].restarted = time.time()
        last_restart = time.monotonic()
        assert sum(len(k.running) for k in kills) > 0, "the kills hit no running step"
        # Each kill may take one popped message per worker with it (see settle).
        unsettled = settle(cluster, last_restart, label, lost_at_most=len(kills) * len(names))
        say(f"[{label}] total {time.monotonic() - t0:.1f}s from the first saga started")
        check_outcome(cluster, started, kills, label, unsettled)
    finally:
        cluster.close()


def test_broker_restarted_mid_run(
    private_redis: PrivateRedis, shared_db: str, tmp_path: Path
) -> None:
    rng = random.Random(SEED + 1)
    cluster = Cluster(private_redis.url, shared_db, shared_db, tmp_path)
    try:
        cluster.start_workers()
        started = cluster.start_sagas(50, rng)
        t0 = time.monotonic()
        time.sleep(rng.uniform(1.0, 2.0))
        in_flight = cluster.not_terminal()
        private_redis.stop()  # no persistence: every queued message is gone
        down_at = time.monotonic() - t0
        time.sleep(2.0)
        private_redis.start()
        last_restart = time.monotonic()
        say(
            f"\n[broker] redis stopped at +{down_at:.2f}s with {in_flight} sagas in flight, "
            f"back after {time.monotonic() - t0 - down_at:.2f}s"
        )
        assert in_flight > 0
        assert all(w.is_running() for w in cluster.live)
        unsettled = settle(cluster, last_restart, "broker")
        check_outcome(cluster, started, [], "broker", unsettled)
    finally:
        cluster.close()


def test_store_restarted_mid_run(
    store_kind: str,
    private_redis: PrivateRedis,
    shared_db: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    rng = random.Random(SEED + 2)
    server: PrivatePostgres | PrivateRedis
    if store_kind == "redis":
        server, label = request.getfixturevalue("store_redis"), "store/redis"
    else:
        server, label = PrivatePostgres(), "store"
    cluster: Cluster | None = None
    try:
        cluster = Cluster(private_redis.url, server.url, shared_db, tmp_path)  # ledger: shared
        cluster.start_workers()
        started = cluster.start_sagas(50, rng)
        t0 = time.monotonic()
        time.sleep(rng.uniform(1.0, 2.0))
        in_flight = cluster.not_terminal()
        if isinstance(server, PrivatePostgres):
            server.stop("fast")  # every session is terminated, no connection accepted
        else:
            server.stop()  # SIGTERM: every connection is dropped; the AOF keeps the data
        down_at = time.monotonic() - t0
        wait_until(lambda: not server.is_running(), timeout=15, what=f"{store_kind} down")
        time.sleep(2.0)
        server.start()  # on the same port
        last_restart = time.monotonic()
        say(
            f"\n[{label}] {store_kind} stopped at +{down_at:.2f}s with {in_flight} sagas "
            f"in flight, back after {time.monotonic() - t0 - down_at:.2f}s"
        )
        assert in_flight > 0
        assert all(w.is_running() for w in cluster.live)
        unsettled = settle(cluster, last_restart, label)
        # Nothing the store acknowledged was lost: every saga started is still there.
        counts = cluster.runtime.store.count_by_status(cluster.saga.name)
        assert sum(counts.values()) == len(started), f"sagas in the store: {counts}"
        check_outcome(cluster, started, [], label, unsettled)
    finally:
        if cluster is not None:
            cluster.close()
        if isinstance(server, PrivatePostgres):
            server.destroy()


def test_worker_killed_while_a_sibling_runs_during_rollback(
    private_redis: PrivateRedis, shared_db: str, tmp_path: Path
) -> None:
    """The kill of test 1, aimed: b has failed (the saga is COMPENSATING) while its
    sibling a is still RUNNING and has already applied its effect; then every worker
    dies. a's outcome is unknown to the engine, so it must be undone too."""
    rng = random.Random(SEED + 3)
    cluster = Cluster(private_redis.url, shared_db, shared_db, tmp_path, saga=chaos_app.pair)
    try:
        cluster.start_workers()
        # a applies its effect after 1.5 s and returns after 3 s; b fails after 0.1 s.
        started = cluster.start_sagas(
            2, rng, all_fail=True, durations={"a": 3.0, "b": 0.2, "undo": 0.05}
        )
        t0 = time.monotonic()

        def applied_during_rollback() -> bool:
            with psycopg.connect(cluster.ledger_dsn) as conn:
                done = {
                    r[0]
                    for r in conn.execute(
                        "SELECT saga_id FROM chaos_ledger WHERE step = 'a' AND action = 'do'"
                    )
                }
            compensating = {
                r.saga_id
                for r in cluster.runtime.store.list_sagas(
                    sagaline.records.SagaFilter(status=[SagaStatus.COMPENSATING], limit=10)
                )
            }
            running = {sid for sid, step, _ in cluster.running_steps() if step == "a"}
            return bool(done & compensating & running)

        wait_until(
            applied_during_rollback,
            timeout=20,
            interval=0.05,
            what="a saga rolling back with a applied and still running",
        )
        kill = cluster.kill_workers(t0)
        cluster.start_workers()
        last_restart = time.monotonic()
        assert kill.running, "the kill hit no running step"
        unsettled = settle(cluster, last_restart, "rollback-kill")
        check_outcome(cluster, started, [kill], "rollback-kill", unsettled)
    finally:
        cluster.close()
