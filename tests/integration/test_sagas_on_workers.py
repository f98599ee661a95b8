"""The engine on real Celery workers (prefork, separate processes).

Each test runs on every stack: Redis broker + PostgreSQL store, the embedded
defaults (filesystem broker + SQLite store), Redis broker + Redis store (on one
server, and on a Redis Cluster of three masters), and RabbitMQ + PostgreSQL with
classic and with quorum queues. Outcomes are checked
from ledger rows that steps and compensations write to PostgreSQL, not from logs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator

import pytest

import sagaline
from sagaline import SagaCompensated, SagaStatus
from sagaline.records import Dispatch
from sagaline.states import Phase
from tests.harness import REPO_ROOT, wait_until
from tests.integration import sagas_app
from tests.integration.conftest import (
    BROKER_STACKS,
    CLUSTER_STACK,
    Stack,
    cluster_store_url,
    make_stack,
)


@pytest.fixture(scope="module", params=BROKER_STACKS)
def stack(
    request: pytest.FixtureRequest,
    pg_url: str,
    redis_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    """Every stack, RabbitMQ with classic and with quorum queues included."""
    store_url = cluster_store_url(request) if request.param == CLUSTER_STACK else None
    yield from make_stack(request.param, pg_url, redis_url, tmp_path_factory, store_url=store_url)


def test_failing_last_step_compensates_the_others_once_in_reverse_order(stack: Stack) -> None:
    handle = stack.run(sagas_app.four_steps, value=10, fail_at="s4")
    with pytest.raises(SagaCompensated) as info:
        handle.get(timeout=60)
    assert info.value.step == "s4"
    assert "s4 failed on purpose" in (info.value.cause or "")
    assert handle.status is SagaStatus.COMPENSATED
    rows = stack.ledger(handle.saga_id)
    assert [(s, a) for s, a, *_ in rows] == [
        ("s1", "do"),
        ("s2", "do"),
        ("s3", "do"),
        ("s3", "undo"),
        ("s2", "undo"),
        ("s1", "undo"),
    ]
    undo_data = {s: d for s, a, d, *_ in rows if a == "undo"}
    assert undo_data == {
        "s3": {"step": "s3", "value": 12},
        "s2": {"step": "s2", "value": 11},
        "s1": {"step": "s1", "value": 10},
    }


def test_completed_saga_returns_the_merged_context(stack: Stack) -> None:
    handle = stack.run(sagas_app.four_steps, value=1)
    result = handle.get(timeout=60)
    assert result == {
        "value": 1,
        "s1_done": True,
        "s2_done": True,
        "s3_done": True,
        "s4_done": True,
    }
    assert [a for _, a, *_ in stack.ledger(handle.saga_id)] == ["do"] * 4
    view = sagaline.get_saga(handle.saga_id, runtime=stack.runtime)
    assert view.status is SagaStatus.COMPLETED
    assert [s.status.value for s in view.steps] == ["SUCCEEDED"] * 4
    kinds = [e.kind for e in view.history]
    assert kinds[0] == "saga_started" and kinds[-1] == "saga_completed"
    assert kinds.count("step_started") == 4
    # Task log lines carry the saga and the step.
    assert f"saga={handle.saga_id} step=s3: applying s3" in stack.worker.log_text()


def test_dag_branches_run_concurrently_and_a_failed_branch_rolls_back_its_sibling(
    stack: Stack,
) -> None:
    ok = stack.run(sagas_app.dag, sleep=1.0)
    ok.get(timeout=60)
    windows = {s: (st, fin) for s, a, _, st, fin in stack.ledger(ok.saga_id) if a == "do"}
    (b0, b1), (c0, c1) = windows["b"], windows["c"]
    assert b0 < c1 and c0 < b1, f"b and c did not overlap: {windows}"
    assert windows["d"][0] >= max(b1, c1)

    failed = stack.run(sagas_app.dag, sleep=1.0, fail_c=True)
    with pytest.raises(SagaCompensated):
        failed.get(timeout=60)
    rows = [(s, a) for s, a, *_ in stack.ledger(failed.saga_id)]
    assert ("d", "do") not in rows and ("c", "do") not in rows
    undo = [s for s, a in rows if a == "undo"]
    assert undo == ["b", "a"], rows
    view = sagaline.get_saga(failed.saga_id, runtime=stack.runtime)
    assert view.step("d").status.value in ("PENDING", "CANCELLED")


def test_steps_receive_only_accepted_kwargs_and_not_a_sibling_branch_output(stack: Stack) -> None:
    handle = stack.run(sagas_app.kwargs_probe, order_id="o-1", extra="x")
    handle.get(timeout=60)
    got = {s: d for s, a, d, *_ in stack.ledger(handle.saga_id) if a == "kwargs"}
    assert got["narrow"] == {"order_id": "o-1"}
    # **kwargs receives the whole context: input, saga_id, ancestors' outputs.
    assert got["sibling_a"] == {
        "order_id": "o-1",
        "extra": "x",
        "saga_id": handle.saga_id,
        "narrow_out": 1,
    }
    assert got["after_a"]["sibling_a_out"] == 2
    # sibling_b runs beside sibling_a: it never sees sibling_a's output.
    assert "sibling_a_out" not in got["sibling_b"] and got["sibling_b"]["narrow_out"] == 1


def test_a_duplicate_step_message_runs_user_code_once(stack: Stack) -> None:
    handle = stack.run(sagas_app.four_steps, value=5)
    handle.get(timeout=60)
    before = sagaline.get_saga(handle.saga_id, runtime=stack.runtime)
    duplicate = Dispatch(
        handle.saga_id,
        "four_steps",
        sagas_app.four_steps.fingerprint,
        "s2",
        Phase.FORWARD,
        1,
        "t.s2",
        {"saga_id": handle.saga_id, "value": 5, "s1_done": True},
    )
    stack.runtime.publish([duplicate, duplicate])
    time.sleep(3)
    after = sagaline.get_saga(handle.saga_id, runtime=stack.runtime)
    assert [a for s, a, *_ in stack.ledger(handle.saga_id) if s == "s2"] == ["do"]
    assert len(after.history) == len(before.history)
    assert [(s.status, s.version) for s in after.steps] == [
        (s.status, s.version) for s in before.steps
    ]


def test_a_retried_step_records_each_attempt(stack: Stack) -> None:
    handle = stack.run(sagas_app.retrying, fail_times=2)
    assert handle.get(timeout=60)["flaky_attempts"] == 3
    view = sagaline.get_saga(handle.saga_id, runtime=stack.runtime)
    failed = [e for e in view.history if e.kind == "step_attempt_failed"]
    assert [e.attempt for e in failed] == [1, 2]
    assert all("ConnectionError" in e.detail["error"] for e in failed)
    assert [d["attempt"] for s, a, d, *_ in stack.ledger(handle.saga_id)] == [1, 2, 3]


def test_retries_wait_out_their_backoff_without_a_broker_eta(stack: Stack) -> None:
    handle = stack.run(sagas_app.backing_off, fail_times=2)
    assert handle.get(timeout=60)["flaky_attempts"] == 3
    view = sagaline.get_saga(handle.saga_id, runtime=stack.runtime)
    waits = [e.detail["retry_in"] for e in view.history if e.kind == "step_attempt_failed"]
    assert len(waits) == 2 and 0.9 <= waits[0] <= 1.1 and 1.8 <= waits[1] <= 2.2, waits
    started = [fin for s, a, _, _, fin in stack.ledger(handle.saga_id) if a == "attempt"]
    assert len(started) == 3
    for before, after, wait in zip(started, started[1:], waits, strict=False):
        # Not before its backoff, and not much later: the message is sent when due.
        assert wait <= after - before < wait + 1.5, (started, waits)
    # Celery warns on every countdown published to a quorum queue bound to a direct
    # exchange; sagaline publishes none.
    assert "Direct exchanges are not supported" not in stack.worker.log_text()


def test_retries_waiting_their_backoff_leave_the_worker_free(stack: Stack) -> None:
    # The worker takes 3 messages at a time (-c 3, prefetch multiplier 1). A retry held
    # as a broker ETA would sit unacknowledged in one of those slots until due, and on
    # a quorum queue Celery cannot raise the prefetch to make room: four of them would
    # stall every other saga for their whole backoff.
    waiting = [stack.run(sagas_app.slow_backoff, fail_times=1) for _ in range(4)]
    wait_until(
        lambda: all(len(stack.ledger(h.saga_id)) == 1 for h in waiting),
        timeout=30,
        what="the first attempts to fail",
    )
    started = time.monotonic()
    stack.run(sagas_app.four_steps, value=2).get(timeout=60)
    took = time.monotonic() - started
    assert took < sagas_app.SLOW_BACKOFF / 2, f"a saga waited {took:.1f}s behind retries"
    assert all(len(stack.ledger(h.saga_id)) == 1 for h in waiting), "a retry ran too early"
    for h in waiting:
        assert h.get(timeout=60)["flaky_attempts"] == 2


def test_non_json_input_is_refused_before_anything_is_stored(stack: Stack) -> None:
    before = stack.runtime.store.count_by_status()
    with pytest.raises(sagaline.InputError, match="'when'"):
        stack.run(sagas_app.four_steps, value=1, when=object())
    assert stack.runtime.store.count_by_status() == before


def test_non_json_step_output_fails_the_step_and_compensates(stack: Stack) -> None:
    handle = stack.run(sagas_app.bad_output, value=3)
    with pytest.raises(
        SagaCompensated, match=r"output of step 'unjson'\['when'\]: type object is not JSON"
    ):
        handle.get(timeout=60)
    assert [(s, a) for s, a, *_ in stack.ledger(handle.saga_id)] == [("s1", "do"), ("s1", "undo")]


CONCURRENT_RUNS = """
import json, os, sys, threading
from celery import Celery
import sagaline
from tests.integration import sagas_app
from tests.integration.conftest import Stack
client = Celery("proc")
if os.environ.get("SAGALINE_TEST_QUEUE_TYPE"):
    client.conf.task_default_queue_type = os.environ["SAGALINE_TEST_QUEUE_TYPE"]
rt = sagaline.init_app(client, store=sys.argv[1], sweeper=False)
ids = []
def go():
    ids.append(rt.start_saga(sagas_app.four_steps, {"value": 1},
                             idempotency_key=sys.argv[2]).saga_id)
threads = [threading.Thread(target=go) for _ in range(5)]
[t.start() for t in threads]; [t.join(60) for t in threads]
print(json.dumps(ids))
"""


def test_concurrent_runs_with_one_idempotency_key_make_one_execution(stack: Stack) -> None:
    key = f"order-{uuid.uuid4()}"
    store = stack.env["SAGALINE_STORE_URL"]
    env = {**os.environ, **{k: v for k, v in stack.env.items() if v}}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CONCURRENT_RUNS, store, key],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    ids: list[str] = []
    lock = threading.Lock()

    def go() -> None:
        saga_id = stack.runtime.start_saga(
            sagas_app.four_steps, {"value": 1}, idempotency_key=key
        ).saga_id
        with lock:
            ids.append(saga_id)

    threads = [threading.Thread(target=go) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0
        ids += json.loads(out.strip().splitlines()[-1])
    assert len(ids) == 20
    assert len(set(ids)) == 1, set(ids)
    matching = [
        s
        for s in stack.runtime.store.list_sagas(
            sagaline.records.SagaFilter(name="four_steps", limit=1000)
        )
        if s.idempotency_key == key
    ]
    assert len(matching) == 1
    sagaline.SagaHandle(stack.runtime, ids[0], "four_steps").get(timeout=60)
    assert [a for _, a, *_ in stack.ledger(ids[0])] == ["do"] * 4
