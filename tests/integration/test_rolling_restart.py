"""A rolling deploy under load, then a node lost for good.

500 sagas of `chaos_app.diamond` (a, then b and c in parallel, then d; steps take
50-300 ms; every other saga fails at d and compensates) run on three prefork
worker nodes, `-n w1@%h`, `w2@%h` and `w3@%h`, each `-c 4` with its own
SAGALINE_HOME, over RabbitMQ (a fresh vhost on the shared node) with the state
on a fresh PostgreSQL database, and a 5 s lease swept every second.

While the sagas run, the nodes are restarted one after another as a rolling
deploy does: SIGTERM to the node's main process (Celery's warm shutdown), wait
until it exited, start it again under the same node name and wait until it is
ready, then the next node. Then one node is killed with SIGKILL, its main process
and its pool processes, and never comes back.

Asserted:
- every saga terminal and consistent (`test_chaos.check_outcome`: per saga, the
  ledger the steps write shows every step applied, or every applied step undone
  once, after the steps that depend on it; a step body ran twice only where the
  kill cut its first run short);
- a warm shutdown cuts nothing short: each exits by itself (status 0) and no
  attempt but those of the killed node ends as crashed (`lease_expired`,
  `worker_lost`); a second run of a body started after the kill, never beside
  the first;
- no saga waits on the dead node for longer than the lease: every step the
  killed node was running is failed as `lease_expired` by another node's sweeper
  within lease + sweep interval + TAKEOVER_SLACK of the kill.
"""

from __future__ import annotations

import itertools
import random
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from sagaline.records import Event
from tests.harness import WorkerProcess, drop_database, rabbitmq_vhost, shared_postgres_url
from tests.integration import chaos_app
from tests.integration.test_chaos import (
    CRASHED,
    LEASE,
    SEED,
    SWEEP_INTERVAL,
    Cluster,
    Kill,
    _report_in_the_test_output,  # noqa: F401 - autouse: the summary goes to the output
    check_outcome,
    history_text,
    say,
    settle,
)

pytestmark = pytest.mark.chaos

SAGAS = 500
NODES = ["w1", "w2", "w3"]
DEAD = "w2"  # the node killed at the end, restarted once before
CONCURRENCY = 4  # pool processes per node: the steps mostly sleep
STOP_TIMEOUT = 30.0  # a warm shutdown waits for the running steps (300 ms at most)
SETTLE_AFTER_KILL = 90.0
# A step's message waits behind the backlog of 500 sagas for up to the whole run: with
# a shorter redispatch_after the sweeper would publish waiting steps again (5 s: ~3,500
# copies, each refused by the claim; 90 s for the test instead of 66). Nothing here
# loses a message: the killed node's unacknowledged ones come back from RabbitMQ at once.
REDISPATCH_AFTER = 60.0
# Beyond lease + sweep interval: the sweeper's pass itself, on a loaded 2-core machine.
TAKEOVER_SLACK = 4.0
TAKEOVER_BOUND = LEASE + SWEEP_INTERVAL + TAKEOVER_SLACK


@dataclass
class Deploy:
    """One node's restart in the rolling deploy."""

    node: str
    at: float  # seconds since the sagas were started
    in_flight: int  # sagas not terminal when the node was sent SIGTERM
    running: int  # steps the node was running then
    exit_status: int | None
    stop_s: float  # SIGTERM -> every process of the node gone
    start_s: float  # start -> ready


@pytest.fixture
def amqp_url() -> Iterator[str]:
    with rabbitmq_vhost("sagaline-rolling") as url:
        yield url


@pytest.fixture
def database() -> Iterator[str]:
    url = shared_postgres_url(f"sagaline_rolling_{uuid.uuid4().hex[:10]}")
    try:
        yield url
    finally:
        drop_database(url)


def live_node(cluster: Cluster, name: str) -> WorkerProcess:
    return next(w for w in cluster.live if w.name == name)


def redeploy(cluster: Cluster, name: str, t0: float) -> Deploy:
    """Warm-stop node `name` (SIGTERM to its main process), then start it again under
    the same name and wait until it is ready."""
    old = live_node(cluster, name)
    in_flight, running = cluster.not_terminal(), len(cluster.running_steps([name]))
    at = time.monotonic()
    old.stop(timeout=STOP_TIMEOUT)  # SIGKILL of its group only after STOP_TIMEOUT
    cluster.live.remove(old)
    stopped = time.monotonic()
    cluster.start_workers(names=[name])
    deploy = Deploy(
        name,
        at - t0,
        in_flight,
        running,
        old.returncode,
        stopped - at,
        time.monotonic() - stopped,
    )
    say(
        f"[rolling] {name} SIGTERM at +{deploy.at:.1f}s ({in_flight} sagas in flight, "
        f"{running} steps running on it): exited {deploy.exit_status} after "
        f"{deploy.stop_s:.1f}s, ready again after {deploy.start_s:.1f}s"
    )
    return deploy


def takeovers(kill: Kill, histories: dict[str, list[Event]]) -> list[tuple[float, str, Event]]:
    """Per step the killed node was running: the first event of that step after the
    kill (another node acting on it), with the seconds since the kill; largest first."""
    found = []
    for saga_id, step, phase in kill.running:
        after = [
            e
            for e in histories[saga_id]
            if e.step == step and (e.phase or "") == phase and e.ts > kill.killed
        ]
        if after:
            first = min(after, key=lambda e: e.ts)
            found.append((first.ts - kill.killed, saga_id, first))
    return sorted(found, key=lambda x: x[0], reverse=True)


def runs_beside_each_other(cluster: Cluster, kill: Kill) -> list[str]:
    """Bodies that ran more than once where a later run did not start after the kill,
    or an earlier run was not in a process the kill ended."""
    with psycopg.connect(cluster.ledger_dsn) as conn:
        rows = conn.execute(
            "SELECT saga_id, step, phase, pid, ts FROM chaos_executions ORDER BY ts"
        ).fetchall()
    runs: dict[tuple[str, str, str], list[tuple[int, float]]] = defaultdict(list)
    for saga_id, step, phase, pid, ts in rows:
        runs[(saga_id, step, phase)].append((pid, ts))
    bad = []
    for key, each in runs.items():
        for (pid, _), (_, later) in itertools.pairwise(each):
            if pid not in kill.pids or later <= kill.killed:
                bad.append(f"{key}: runs {each}")
                break
    return bad


def test_rolling_restart_under_load_then_a_node_lost_for_good(
    amqp_url: str, database: str, tmp_path: Path
) -> None:
    label = "rolling"
    rng = random.Random(SEED + 5)
    cluster = Cluster(
        amqp_url,
        database,
        database,
        tmp_path,
        saga=chaos_app.diamond,
        settle_for=SETTLE_AFTER_KILL,
        concurrency=CONCURRENCY,
        redispatch_after=REDISPATCH_AFTER,
    )
    try:
        cluster.start_workers(names=NODES)
        started = cluster.start_sagas(SAGAS, rng)
        t0 = time.monotonic()
        say(f"\n[{label}] {SAGAS} sagas started on {NODES}")
        deploys = [redeploy(cluster, name, t0) for name in NODES]
        in_flight = cluster.not_terminal()
        kill = cluster.kill_workers(t0, only=[live_node(cluster, DEAD)])
        say(
            f"[{label}] {DEAD} killed at +{kill.at:.1f}s ({len(kill.pids)} processes, "
            f"{in_flight} sagas in flight, {len(kill.running)} steps running on it); "
            f"left: {[w.name for w in cluster.live]}"
        )
        unsettled = settle(cluster, time.monotonic(), label)

        histories = {sid: cluster.runtime.store.history(sid) for sid in started}
        taken = takeovers(kill, histories)
        if taken:
            say(
                f"[{label}] steps of {DEAD} taken over {taken[-1][0]:.1f}-{taken[0][0]:.1f}s "
                f"after the kill (bound {TAKEOVER_BOUND:.0f}s: lease {LEASE:.0f}s + sweep "
                f"{SWEEP_INTERVAL:.0f}s + {TAKEOVER_SLACK:.0f}s)"
            )
        check_outcome(cluster, started, [kill], label, unsettled)

        # The load was on: every restart and the kill found sagas in flight and steps
        # running on the node.
        for d in deploys:
            assert d.in_flight > 0 and d.running > 0, d
        assert kill.running, f"{DEAD} was running nothing when killed"
        # A warm shutdown ends by itself, and cuts nothing short.
        assert [d.exit_status for d in deploys] == [0, 0, 0], deploys
        crashed = {
            (sid, e.step, e.phase or "")
            for sid, events in histories.items()
            for e in events
            if e.detail.get("reason") in CRASHED
        }
        assert crashed <= kill.running, [
            history_text(cluster, k[0]) for k in crashed - kill.running
        ]
        assert not runs_beside_each_other(cluster, kill)
        # No saga waited on the dead node beyond the lease: each of its steps was
        # failed as a crashed attempt by a live node's sweeper, within the bound.
        assert len(taken) == len(kill.running), "a step of the dead node was never taken over"
        for took, saga_id, event in taken:
            assert event.detail.get("reason") == "lease_expired", history_text(cluster, saga_id)
            assert took <= TAKEOVER_BOUND, history_text(cluster, saga_id)
        # Each node kept its own SAGALINE_HOME: its liveness heartbeat is there.
        for name in NODES:
            assert (tmp_path / "home" / name / "worker.heartbeat").exists(), name
    finally:
        cluster.close()
