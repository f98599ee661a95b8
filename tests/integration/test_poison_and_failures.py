"""Hostile failures and poison messages on real workers: one bad saga never stops a
worker and never sticks silently.

Every saga here ends in a terminal state with its real cause in the history, well
before a lease could expire; the worker process is still the same one afterwards;
and once the sweeper has run nothing of the saga is left in flight.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from typer.testing import CliRunner

from sagaline import SagaCompensated, SagaFailed, SagaStatus
from sagaline.cli import cli
from sagaline.ops import SagaView, get_saga, sweep
from sagaline.runtime import HEADER
from sagaline.states import STEP_IN_FLIGHT, StepStatus
from sagaline.stores.sanitize import MAX_TEXT
from tests.harness import REPO_ROOT, wait_until
from tests.integration import poison_sagas, sagas_app
from tests.integration.conftest import Stack, make_stack
from tests.stores import create_mariadb_database, drop_mariadb_database

pytestmark = pytest.mark.timeout(300)

# Far longer than any saga here takes: a failure that waited for its lease to expire
# (the old behaviour when it could not be stored) would show.
LEASE = 60.0
FAST = 30.0


@pytest.fixture(
    scope="module", params=["redis+postgres", "embedded", "redis+redis", "redis+mariadb"]
)
def poison_stack(
    request: pytest.FixtureRequest,
    pg_url: str,
    redis_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    """A worker on every store kind, with a 1 s re-publish delay so that the sweeper's
    redispatches of refused messages happen within the test."""
    env = {
        "SAGALINE_LEASE": str(LEASE),
        "SAGALINE_REDISPATCH_AFTER": "1",
        "SAGALINE_UNKNOWN_TASK_REDISPATCHES": "2",
    }
    store_url = None
    if request.param == "redis+mariadb":
        store_url = create_mariadb_database()
    try:
        yield from make_stack(
            request.param, pg_url, redis_url, tmp_path_factory, env, store_url=store_url
        )
    finally:
        if store_url is not None:
            drop_mariadb_database(store_url)


def settled(stack: Stack, saga_id: str, worker_pid: int) -> SagaView:
    """The saga after a sweeper pass: nothing left in flight, nothing due, and the
    same worker process still running."""
    sweep(stack.runtime)
    view = get_saga(saga_id, runtime=stack.runtime)
    assert view.status in (SagaStatus.COMPLETED, SagaStatus.COMPENSATED, SagaStatus.FAILED)
    assert not [s.name for s in view.steps if s.status in STEP_IN_FLIGHT]
    assert not [s.name for s in view.steps if s.due_at is not None]
    assert stack.worker.is_running() and stack.worker.pid == worker_pid
    return view


def failed_events(view: SagaView, step: str) -> list[dict[str, Any]]:
    return [e.detail for e in view.history if e.kind == "step_failed" and e.step == step]


# -- failure text that stores refuse as such -------------------------------------------------

HOSTILE = {
    # kind -> what the stored cause contains
    "nul": "RuntimeError: bad\\x00byte",
    "lone_surrogate": "RuntimeError: half a character: \\ud800",
    "huge": "characters cut by sagaline",
}


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_a_step_failing_with_hostile_text_compensates_at_once_with_its_cause(
    poison_stack: Stack, kind: str
) -> None:
    pid = poison_stack.worker.pid
    started = time.monotonic()
    handle = poison_stack.run(poison_sagas.hostile_failure, value=1, kind=kind)
    with pytest.raises(SagaCompensated) as info:
        handle.get(timeout=FAST)
    assert time.monotonic() - started < FAST < LEASE
    assert info.value.step == "raise_hostile"
    assert HOSTILE[kind] in (info.value.cause or "")
    view = settled(poison_stack, handle.saga_id, pid)
    step = view.step("raise_hostile")
    assert step.attempt == 1 and step.status is StepStatus.FAILED
    assert step.error is not None and HOSTILE[kind] in step.error
    assert len(step.error) <= MAX_TEXT
    [detail] = failed_events(view, "raise_hostile")
    assert detail["reason"] == "error" and HOSTILE[kind] in detail["error"]
    # The body ran once: no lease expired, no crash retry.
    assert [e.kind for e in view.history if e.step == "raise_hostile"].count("step_started") == 1
    assert [a for s, a, *_ in poison_stack.ledger(handle.saga_id)] == ["do", "undo"]


# -- messages that cannot be delivered ---------------------------------------------------------


def send_copy(
    stack: Stack, saga_id: str, step: str, *, serializer: str, kwargs: dict[str, Any]
) -> None:
    """Send the worker a copy of a DISPATCHED step's message, with a body of our choice."""
    saga = stack.runtime.store.get_saga(saga_id)
    assert saga is not None
    rec = next(s for s in stack.runtime.store.get_steps(saga_id) if s.name == step)
    meta = {
        "saga_id": saga_id,
        "saga": saga.name,
        "fingerprint": saga.fingerprint,
        "step": step,
        "phase": "forward",
        "attempt": rec.attempt,
    }
    stack.runtime.app.send_task(
        "t.big",
        kwargs=kwargs,
        headers={HEADER: meta},
        serializer=serializer,
        queue="celery",
        ignore_result=True,
    )


def step_dispatched(stack: Stack, saga_id: str, step: str) -> bool:
    return any(
        s.name == step and s.status is StepStatus.DISPATCHED
        for s in stack.runtime.store.get_steps(saga_id)
    )


POISON = {
    # case -> (saga, the step, the reason in its step_failed event, the cause contains)
    "context_lacks_an_argument": (
        poison_sagas.parked_step,
        "big",
        "message_unsendable",
        "message not sent: TypeError: big() missing 1 required positional argument: 'x'",
    ),
    "task_not_registered": (
        poison_sagas.unregistered_step,
        "nobody_has_this",
        "task_unregistered",
        "TaskNotRegistered: no worker has task 't.nobody_has_this'",
    ),
    "undecodable_body": (
        poison_sagas.parked_step,
        "big",
        "message_undeliverable",
        "message undecodable: DecodeError",
    ),
    "refused_content_type": (
        poison_sagas.parked_step,
        "big",
        "message_undeliverable",
        "message rejected by the worker: ContentDisallowed",
    ),
}


@pytest.mark.parametrize("case", sorted(POISON))
def test_an_undeliverable_message_fails_its_step_and_the_saga_compensates(
    poison_stack: Stack, case: str
) -> None:
    saga, step, reason, cause = POISON[case]
    pid = poison_stack.worker.pid
    # Celery checks a task's arguments when it sends it: without `x` in the context,
    # parked_step's message cannot be sent; with it, it waits in a queue nobody reads.
    extra = {} if case == "context_lacks_an_argument" else {"x": "y"}
    handle = poison_stack.run(saga, value=1, **extra)
    if case == "undecodable_body":
        wait_until(lambda: step_dispatched(poison_stack, handle.saga_id, step), timeout=FAST)
        # kombu's JSON decoder turns this envelope into a datetime, and fails.
        send_copy(
            poison_stack,
            handle.saga_id,
            step,
            serializer="json",
            kwargs={"x": {"__type__": "datetime", "__value__": "not a date"}},
        )
    elif case == "refused_content_type":
        wait_until(lambda: step_dispatched(poison_stack, handle.saga_id, step), timeout=FAST)
        send_copy(poison_stack, handle.saga_id, step, serializer="pickle", kwargs={"x": "y"})
    with pytest.raises(SagaCompensated) as info:
        handle.get(timeout=FAST)
    assert info.value.step == step
    assert cause in (info.value.cause or "")
    view = settled(poison_stack, handle.saga_id, pid)
    [detail] = failed_events(view, step)
    assert detail["reason"] == reason and detail["permanent"] is True
    assert [a for s, a, *_ in poison_stack.ledger(handle.saga_id)] == ["do", "undo"]
    if case == "task_not_registered":
        refusals = [e.detail for e in view.history if e.kind == "task_unregistered"]
        # The first publish and the two redispatches at least (a copy still in flight
        # when the step failed is refused and recorded too).
        assert len(refusals) >= 3
        assert all(
            r["task"] == "t.nobody_has_this" and poison_stack.worker.name in r["worker"]
            for r in refusals
        )
        code, out, err = invoke(
            "show", handle.saga_id, "--store", poison_stack.runtime.settings.store_url
        )
        assert code == 0, err
        assert "has no task 't.nobody_has_this'" in out and "TaskNotRegistered" in out


def test_the_worker_names_step_tasks_it_does_not_have(poison_stack: Stack) -> None:
    log = poison_stack.worker.log_text()
    assert (
        "saga 'unregistered_step' step 'nobody_has_this': task 't.nobody_has_this' is "
        "not registered in this worker"
    ) in log
    # Only that one: every other step task of the app's sagas is there.
    assert log.count("is not registered in this worker; its messages will be refused") == 1


# -- a compensation that fails for good ------------------------------------------------------


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args), env={"COLUMNS": "400"})
    return result.exit_code, result.stdout, result.stderr


def test_a_failed_saga_says_which_compensation_failed_and_why(poison_stack: Stack) -> None:
    switch = f"poison-{poison_stack.name}-{time.monotonic_ns()}"
    with psycopg.connect(poison_stack.ledger_dsn, autocommit=True) as conn:
        conn.execute(sagas_app.SWITCHES_DDL)
        conn.execute("INSERT INTO switches VALUES (%s, -1)", (switch,))
    handle = poison_stack.run(sagas_app.fragile, value=1, fail_at="s3", switch=switch)
    with pytest.raises(SagaFailed) as info:
        handle.get(timeout=FAST)
    why = (
        f"compensation of 's2' failed: ConnectionError: compensation of s2 failed (switch {switch})"
    )
    assert why in str(info.value)
    assert "s3 failed on purpose" in str(info.value)
    assert info.value.compensation_failures == {
        "s2": f"ConnectionError: compensation of s2 failed (switch {switch})"
    }

    store = poison_stack.runtime.settings.store_url
    code, out, err = invoke(
        "ls", "--json", "--status", "failed", "--limit", "1000", "--store", store
    )
    assert code == 0, err
    [line] = [json.loads(x) for x in out.splitlines() if handle.saga_id in x]
    assert why in line["summary"] and "s3 failed on purpose" in line["summary"]
    code, out, err = invoke("ls", "--status", "failed", "--store", store)
    assert code == 0, err
    assert "compensation of 's2' failed" in out
    code, out, err = invoke("show", handle.saga_id, "--store", store)
    assert code == 0, err
    assert "compensation of s2 failed: ConnectionError: compensation of s2 failed" in out


# -- the embedded broker ---------------------------------------------------------------------

# Publishes `n` messages of `size` bytes to queue "race" of a kombu transport folder.
WRITER = """
import sys
from kombu import Connection
import sagaline.broker
sagaline.broker.register()
url, folder, n, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
options = {"data_folder_in": folder, "data_folder_out": folder,
           "control_folder": folder + "/control"}
with Connection(url, transport_options=options) as conn:
    queue = conn.SimpleQueue("race")
    for i in range(n):
        queue.put({"i": i, "x": "x" * size})
"""


def read_while_written(url: str, folder: Path, n: int, size: int) -> tuple[set[int], int]:
    """Messages received whole, and reads that failed, while another process writes."""
    from kombu import Connection

    import sagaline.broker

    sagaline.broker.register()
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, url, str(folder), str(n), str(size)], cwd=REPO_ROOT
    )
    received: set[int] = set()
    failures = 0
    deadline = time.monotonic() + 60
    options = {
        "data_folder_in": str(folder),
        "data_folder_out": str(folder),
        "control_folder": str(folder / "control"),
    }
    try:
        with Connection(url, transport_options=options) as conn:
            queue = conn.SimpleQueue("race")
            for _ in range(100_000):
                if time.monotonic() > deadline or (
                    writer.poll() is not None and queue.qsize() == 0
                ):
                    break
                try:
                    message = queue.get(timeout=0.01)
                except queue.Empty:
                    continue
                except ValueError:  # kombu's transport: half a message read as JSON
                    failures += 1
                    continue
                received.add(message.payload["i"])
                message.ack()
    finally:
        writer.kill()
        writer.wait(timeout=10)
    return received, failures


def test_kombus_filesystem_transport_half_reads_messages_being_written(tmp_path: Path) -> None:
    """Why sagaline has its own transport: kombu's reader takes files still being written."""
    received, failures = read_while_written("filesystem://", tmp_path, 20, 1_000_000)
    assert failures > 0 or len(received) < 20


def test_the_embedded_broker_delivers_every_large_message_whole(tmp_path: Path) -> None:
    received, failures = read_while_written("sagaline-fs://", tmp_path, 20, 1_000_000)
    assert failures == 0
    assert received == set(range(20))
    assert not [p.name for p in tmp_path.iterdir() if p.is_file()]  # no leftovers


@pytest.mark.parametrize("poison_stack", ["embedded"], indirect=True)
def test_batches_of_large_sagas_on_the_embedded_defaults_all_complete(poison_stack: Stack) -> None:
    assert poison_stack.name == "embedded"
    pid = poison_stack.worker.pid
    for _ in range(2):
        handles = [poison_stack.run(poison_sagas.big_input, x="x" * 500_000) for _ in range(6)]
        for handle in handles:
            assert handle.get(timeout=120) == {"x": "x" * 500_000, "size": 500_000}
    assert poison_stack.worker.is_running() and poison_stack.worker.pid == pid
    assert "JSONDecodeError" not in poison_stack.worker.log_text()


# -- reading from a process without init_app -------------------------------------------------


def test_a_process_without_init_app_reads_sagas_from_the_configured_store(
    poison_stack: Stack,
) -> None:
    handle = poison_stack.run(sagas_app.four_steps, value=3)
    handle.get(timeout=FAST)
    code = (
        "import sagaline, sys; v = sagaline.get_saga(sys.argv[1]); "
        "print(v.status.value, len(sagaline.list_sagas(limit=1000)) > 0)"
    )
    env = {**os.environ, "SAGALINE_STORE_URL": poison_stack.runtime.settings.store_url}
    proc = subprocess.run(
        [sys.executable, "-c", code, handle.saga_id],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["COMPLETED", "True"]
