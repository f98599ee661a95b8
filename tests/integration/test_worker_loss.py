"""A step whose worker process is gone runs again in seconds, not after its lease.

Real prefork workers with the DEFAULT settings (a 60 s lease, renewed every 20 s;
a sweep every 5 s) run `chaos_app.fork` (a, then b and c in parallel). Each test
takes the process running step `a` away in one way and measures how soon `a`
runs again (or the saga ends): a pool process killed, the whole worker killed and
restarted under the same node name, a warm shutdown (SIGTERM) and a cold one
(SIGQUIT) during a rolling deploy. Every bound below is far inside the lease.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import redis
from celery import Celery

import sagaline
from sagaline import SagaStatus
from sagaline.records import Event, StepRecord
from sagaline.runtime import Runtime
from sagaline.states import StepStatus
from tests.harness import (
    PrivateRedis,
    WorkerProcess,
    drop_database,
    rabbitmq_vhost,
    shared_postgres_url,
)
from tests.integration import chaos_app

pytestmark = pytest.mark.timeout(180)
# A pool process is killed at one of two moments (chaos_app's CHAOS_PAUSE): after
# Celery handed it the step's message, before the claim ("before_claim"); after the
# step's completion committed, before the messages it dispatched were published
# ("before_publish").

APP = "tests.integration.chaos_app"
LEASE = 60.0  # sagaline's default: no test here changes it
RUNS_AGAIN_WITHIN = 10.0


@dataclass
class Cluster:
    env: dict[str, str]
    runtime: Runtime
    ledger_dsn: str
    tmp: Path

    def worker(
        self, name: str, extra_args: Sequence[str] = (), *, pause: str | None = None
    ) -> WorkerProcess:
        """A worker of chaos_app; `pause` ("before_claim:a", "before_publish:a"): its
        first pool process to get there pauses (see chaos_app), pid in `pause_file`."""
        env = dict(self.env)
        if pause is not None:
            env.update(CHAOS_PAUSE=pause, CHAOS_PAUSE_FILE=str(self.pause_file))
        return WorkerProcess(
            APP,
            env=env,
            concurrency=2,
            name=name,
            workdir=self.tmp / f"{name}-{uuid.uuid4().hex[:6]}",
            extra_args=extra_args,
        )

    @property
    def pause_file(self) -> Path:
        return self.tmp / "paused.pid"

    def wait_paused(self, timeout: float = 30) -> int:
        """The pid of the pool process that paused (bounded by `timeout`)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.pause_file.exists() and self.pause_file.read_text().strip():
                return int(self.pause_file.read_text())
            time.sleep(0.05)
        raise AssertionError(f"no pool process paused within {timeout}s")

    def start_fork(self, a: float) -> str:
        durations = {"a": a, "b": 0.1, "c": 0.1, "undo": 0.05}
        handle = self.runtime.start_saga(
            chaos_app.fork, {"n": 0, "durations": durations, "fail": None}
        )
        return handle.saga_id

    def step(self, saga_id: str, name: str) -> StepRecord:
        (rec,) = [s for s in self.runtime.store.get_steps(saga_id) if s.name == name]
        return rec

    def wait_running(self, saga_id: str, name: str, timeout: float = 30) -> StepRecord:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rec = self.step(saga_id, name)
            if rec.status is StepStatus.RUNNING:
                return rec
            time.sleep(0.05)
        raise AssertionError(f"step {name} of {saga_id} never ran: {self.history(saga_id)}")

    def history(self, saga_id: str) -> list[Event]:
        return self.runtime.store.history(saga_id)

    def wait_started(self, saga_id: str, name: str, attempt: int, timeout: float) -> float:
        """Seconds until `name` attempt `attempt` was claimed (bounded by `timeout`)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if any(
                e.kind == "step_started" and e.step == name and e.attempt == attempt
                for e in self.history(saga_id)
            ):
                return time.monotonic() - t0
            time.sleep(0.1)
        raise AssertionError(
            f"{name} attempt {attempt} not started within {timeout}s: "
            f"{[(e.kind, e.step, e.attempt) for e in self.history(saga_id)]}"
        )

    def wait_status(self, saga_id: str, status: SagaStatus, timeout: float) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            saga = self.runtime.store.get_saga(saga_id)
            if saga is not None and saga.status is status:
                return time.monotonic() - t0
            time.sleep(0.1)
        raise AssertionError(f"saga {saga_id} not {status} within {timeout}s")

    def executions(self, saga_id: str) -> list[tuple[str, int, int]]:
        """(step, attempt, pid) of every forward execution of a body, in order."""
        with psycopg.connect(self.ledger_dsn) as conn:
            return [
                (r[0], r[1], r[2])
                for r in conn.execute(
                    "SELECT step, attempt, pid FROM chaos_executions WHERE saga_id = %s "
                    "AND phase = 'forward' ORDER BY id",
                    (saga_id,),
                )
            ]

    def lost(self, saga_id: str) -> list[Event]:
        return [
            e
            for e in self.history(saga_id)
            if e.kind == "step_attempt_failed" and e.detail.get("reason") == "worker_lost"
        ]


@pytest.fixture
def cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """Workers on a private redis-server, or (indirect parameter "rabbitmq/classic",
    "rabbitmq/quorum") on a vhost of their own on the shared RabbitMQ."""
    kind = getattr(request, "param", "redis")
    with contextlib.ExitStack() as stack:
        if kind == "redis":
            broker = PrivateRedis()
            stack.callback(broker.destroy)
            broker_url = broker.url
        else:
            broker_url = stack.enter_context(rabbitmq_vhost("sagaline-loss"))
        db = shared_postgres_url(f"sagaline_loss_{uuid.uuid4().hex[:10]}")
        stack.callback(drop_database, db)
        ledger_dsn = db.replace("postgresql+psycopg://", "postgresql://", 1)
        with psycopg.connect(ledger_dsn, autocommit=True) as conn:
            conn.execute(chaos_app.LEDGER_DDL)
        client = Celery(f"loss-client-{uuid.uuid4().hex[:6]}")
        client.conf.broker_url = broker_url
        env = {
            "CELERY_BROKER_URL": broker_url,
            "SAGALINE_STORE_URL": db,
            "LEDGER_URL": db,
            "SAGALINE_HOME": str(tmp_path / "home"),
        }
        if kind == "rabbitmq/quorum":
            client.conf.task_default_queue_type = "quorum"
            env["SAGALINE_TEST_QUEUE_TYPE"] = "quorum"
        runtime = sagaline.init_app(client, store=db, sweeper=False)
        stack.callback(runtime.store.close)
        assert runtime.settings.lease == LEASE
        runtime.store.count_by_status()  # the schema exists before any worker starts
        for name in ("LEASE", "REDISPATCH_AFTER", "SWEEP_INTERVAL", "CRASH_RETRIES"):
            env[f"SAGALINE_{name}"] = ""  # the defaults, whatever the caller's environment
        yield Cluster(env, runtime, ledger_dsn, tmp_path)


def node(name: str) -> str:
    return f"{name}@{socket.gethostname()}"


def test_a_step_whose_pool_process_dies_runs_again_within_seconds(cluster: Cluster) -> None:
    worker = cluster.worker("child-killed")
    try:
        worker.start()
        saga_id = cluster.start_fork(a=4.0)
        rec = cluster.wait_running(saga_id, "a")
        assert rec.owner is not None
        assert rec.owner.node == node("child-killed")
        assert rec.owner.pid in worker.child_pids()
        os.kill(rec.owner.pid, signal.SIGKILL)
        took = cluster.wait_started(saga_id, "a", 2, timeout=RUNS_AGAIN_WITHIN)
        assert took < RUNS_AGAIN_WITHIN
        cluster.wait_status(saga_id, SagaStatus.COMPLETED, timeout=30)
        assert worker.is_running()  # the main process lived on and handed it back
    finally:
        worker.stop()
    (lost,) = cluster.lost(saga_id)
    assert (lost.step, lost.attempt) == ("a", 1)
    assert (
        f"process {rec.owner.pid} of worker {node('child-killed')} exited" in lost.detail["error"]
    )
    # Attempt 1 may have been killed before its body recorded its execution.
    runs = [(a, pid) for s, a, pid in cluster.executions(saga_id) if s == "a"]
    assert [a for a, _ in runs] in ([1, 2], [2])
    assert all(pid == rec.owner.pid for a, pid in runs if a == 1)


def test_a_worker_restarted_under_its_node_name_runs_its_steps_again_at_once(
    cluster: Cluster,
) -> None:
    first = cluster.worker("restarted")
    second = cluster.worker("restarted")
    try:
        first.start()
        saga_id = cluster.start_fork(a=4.0)
        rec = cluster.wait_running(saga_id, "a")
        first.kill()  # SIGKILL of the main process and its pool: nobody hands anything back
        assert cluster.step(saga_id, "a").status is StepStatus.RUNNING
        second.start()
        took = cluster.wait_started(saga_id, "a", 2, timeout=RUNS_AGAIN_WITHIN)
        assert took < RUNS_AGAIN_WITHIN
        cluster.wait_status(saga_id, SagaStatus.COMPLETED, timeout=30)
    finally:
        first.kill()
        second.stop()
    (lost,) = cluster.lost(saga_id)
    assert (lost.step, lost.attempt) == ("a", 1)
    assert f"worker {node('restarted')} restarted" in lost.detail["error"]
    assert rec.owner is not None
    assert f"pid {rec.owner.pid}" in lost.detail["error"]
    assert [a for s, a, _ in cluster.executions(saga_id) if s == "a"] in ([1, 2], [2])


def test_running_steps_do_not_take_the_place_of_prefetched_messages(cluster: Cluster) -> None:
    """A running step holds its message's ack, which counts against the prefetch: the
    worker raises its prefetch by its pool size, so it still holds as many messages
    waiting as Celery's setting asks (concurrency 2 x prefetch multiplier 1)."""
    worker = cluster.worker("held")
    broker = redis.Redis.from_url(cluster.env["CELERY_BROKER_URL"])
    try:
        worker.start()
        saga_ids = [cluster.start_fork(a=6.0) for _ in range(6)]

        def state() -> tuple[int, int]:
            running = [
                sid for sid in saga_ids if cluster.step(sid, "a").status is StepStatus.RUNNING
            ]
            return len(running), int(broker.hlen("unacked"))

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and state() != (2, 4):
            time.sleep(0.05)
        assert state() == (2, 4), "two running and two prefetched, all unacknowledged"
        time.sleep(1.0)  # and no more than that
        assert state() == (2, 4)
    finally:
        broker.close()
        worker.kill()


def test_messages_a_killed_worker_had_prefetched_run_at_once_after_its_restart(
    cluster: Cluster,
) -> None:
    """Received but not started when the worker died: Redis keeps them unacknowledged for
    an hour; the restarted worker puts them back instead of waiting for the sweeper."""
    # Celery's default prefetching (4 messages per pool process), not chaos_app's 1.
    first = cluster.worker("prefetched", extra_args=["--prefetch-multiplier", "4"])
    second = cluster.worker("prefetched", extra_args=["--prefetch-multiplier", "4"])
    broker = redis.Redis.from_url(cluster.env["CELERY_BROKER_URL"])
    try:
        first.start()
        saga_ids = [cluster.start_fork(a=8.0) for _ in range(6)]

        # Two run (concurrency 2); the other four wait in the worker. All six are
        # unacknowledged: a step's message is acknowledged once the step ended.
        def two_running_four_waiting() -> bool:
            running = [
                sid for sid in saga_ids if cluster.step(sid, "a").status is StepStatus.RUNNING
            ]
            return broker.hlen("unacked") >= 6 and len(running) == 2

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not two_running_four_waiting():
            time.sleep(0.05)
        assert two_running_four_waiting(), "the worker did not prefetch the other steps"
        waiting = [
            sid for sid in saga_ids if cluster.step(sid, "a").status is StepStatus.DISPATCHED
        ]
        assert len(waiting) == 4
        first.kill()
        second.start()
        for sid in waiting:
            took = cluster.wait_started(sid, "a", 1, timeout=RUNS_AGAIN_WITHIN)
            assert took < RUNS_AGAIN_WITHIN  # not redispatch_after (30 s) after dispatch
        for sid in saga_ids:
            cluster.wait_status(sid, SagaStatus.COMPLETED, timeout=60)
    finally:
        broker.close()
        first.kill()
        second.stop()
    assert "saga step message(s) that a worker had received" in second.log_text()
    for sid in waiting:
        # A step may have been handed to a pool process just before the kill: then its
        # attempt 1 was cut short and attempt 2 ran; never more.
        assert [a for s, a, _ in cluster.executions(sid) if s == "a"] in ([1], [2], [1, 2])


def test_a_warm_shutdown_finishes_its_step_and_a_new_worker_finishes_the_saga(
    cluster: Cluster,
) -> None:
    old = cluster.worker("old-release")
    new = cluster.worker("new-release")
    try:
        old.start()
        saga_id = cluster.start_fork(a=10.0)
        cluster.wait_running(saga_id, "a")
        new.start()  # a rolling deploy: the new worker is up, then the old one is stopped
        assert cluster.step(saga_id, "a").status is StepStatus.RUNNING
        os.kill(old.pid, signal.SIGTERM)
        took = cluster.wait_status(saga_id, SagaStatus.COMPLETED, timeout=30)
        assert took < 30  # a ends within 10 s of its start; the lease is 60 s
        deadline = time.monotonic() + 20
        while old.is_running() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert old.returncode == 0, old.log_tail()
        new_pids = set(new.child_pids())
    finally:
        old.stop()
        new.stop()
    runs = cluster.executions(saga_id)
    assert [s for s, _, _ in runs].count("a") == 1  # finished during the shutdown, once
    assert {pid for s, _, pid in runs if s in ("b", "c")} <= new_pids
    assert cluster.lost(saga_id) == []


def test_a_cold_shutdown_hands_back_the_step_it_cut_short(cluster: Cluster) -> None:
    old = cluster.worker("cold-old")
    new = cluster.worker("cold-new")
    try:
        old.start()
        new_started = False
        saga_id = cluster.start_fork(a=20.0)
        cluster.wait_running(saga_id, "a")
        new.start()
        new_started = True
        os.kill(old.pid, signal.SIGQUIT)  # cold shutdown: running tasks are terminated
        took = cluster.wait_started(saga_id, "a", 2, timeout=RUNS_AGAIN_WITHIN)
        assert took < RUNS_AGAIN_WITHIN
        assert new_started
    finally:
        old.kill()
        new.kill()
    (lost,) = cluster.lost(saga_id)
    assert (lost.step, lost.attempt) == ("a", 1)


# The broker keeps (or puts back) a message whose ack was held: each broker in turn.
KILLED = [
    pytest.param("redis", "pool process", id="redis-pool-process"),
    pytest.param("redis", "whole worker", id="redis-whole-worker"),
    pytest.param("rabbitmq/classic", "whole worker", id="rabbitmq-classic-whole-worker"),
    pytest.param("rabbitmq/quorum", "whole worker", id="rabbitmq-quorum-whole-worker"),
]


def kill_paused(how: str, pid: int, first: WorkerProcess, second: WorkerProcess) -> None:
    """Kill the paused pool process `pid` (its worker lives on), or the whole worker
    `first` and start `second` under the same node name."""
    if how == "pool process":
        os.kill(pid, signal.SIGKILL)
    else:
        first.kill()
        second.start()


@pytest.mark.parametrize(("cluster", "how"), KILLED, indirect=["cluster"])
def test_a_step_taken_but_not_yet_claimed_by_a_killed_process_runs_within_seconds(
    cluster: Cluster, how: str
) -> None:
    """Nothing in the store says who had the message: only the broker still has it
    (unacknowledged until the step ends), or the worker's main process knows."""
    first = cluster.worker("unclaimed", pause="before_claim:a")
    second = cluster.worker("unclaimed")
    try:
        first.start()
        saga_id = cluster.start_fork(a=0.2)
        pid = cluster.wait_paused()
        assert cluster.step(saga_id, "a").status is StepStatus.DISPATCHED
        kill_paused(how, pid, first, second)
        took = cluster.wait_started(saga_id, "a", 1, timeout=RUNS_AGAIN_WITHIN)
        assert took < RUNS_AGAIN_WITHIN  # not redispatch_after (30 s) after the dispatch
        cluster.wait_status(saga_id, SagaStatus.COMPLETED, timeout=30)
        assert how != "pool process" or first.is_running()
    finally:
        first.kill()
        second.stop()
    assert [a for s, a, _ in cluster.executions(saga_id) if s == "a"] == [1]
    assert cluster.lost(saga_id) == []  # nothing ran, nothing was cut short


@pytest.mark.parametrize(("cluster", "how"), KILLED, indirect=["cluster"])
def test_steps_dispatched_by_a_completion_whose_process_died_before_publishing_run(
    cluster: Cluster, how: str
) -> None:
    first = cluster.worker("unpublished", pause="before_publish:a")
    second = cluster.worker("unpublished")
    try:
        first.start()
        saga_id = cluster.start_fork(a=0.2)
        pid = cluster.wait_paused()
        assert cluster.step(saga_id, "a").status is StepStatus.SUCCEEDED
        assert cluster.step(saga_id, "b").status is StepStatus.DISPATCHED
        kill_paused(how, pid, first, second)
        for step in ("b", "c"):
            took = cluster.wait_started(saga_id, step, 1, timeout=RUNS_AGAIN_WITHIN)
            assert took < RUNS_AGAIN_WITHIN
        cluster.wait_status(saga_id, SagaStatus.COMPLETED, timeout=30)
    finally:
        first.kill()
        second.stop()
    runs = [s for s, _, _ in cluster.executions(saga_id)]
    assert sorted(runs) == ["a", "b", "c"]  # each body once
    assert any(e.kind == "step_redispatched" and e.step == "b" for e in cluster.history(saga_id))
