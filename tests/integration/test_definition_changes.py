"""A worker with other code for a saga leaves it untouched; the right code finishes it."""

from __future__ import annotations

import time

import pytest

import sagaline
from sagaline import SagaStatus
from tests.harness import WorkerProcess
from tests.integration import sagas_app
from tests.integration.conftest import make_stack


def test_a_worker_with_another_definition_records_why_and_changes_nothing(
    pg_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    stacks = make_stack(
        "redis+postgres",
        pg_url,
        redis_url,
        tmp_path_factory,
        {"SAGALINE_TEST_VARIANT": "1", "SAGALINE_REDISPATCH_AFTER": "1"},
    )
    stack = next(stacks)  # its only worker runs a five-step "four_steps"
    try:
        handle = stack.run(sagas_app.four_steps, value=1)
        deadline = time.monotonic() + 30
        while True:
            history = sagaline.get_saga(handle.saga_id, runtime=stack.runtime).history
            mismatches = [e for e in history if e.kind == "definition_mismatch"]
            if mismatches or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert mismatches, [e.kind for e in history]
        assert mismatches[0].detail["saga_fingerprint"] == sagas_app.four_steps.fingerprint
        assert mismatches[0].detail["worker_fingerprint"] != sagas_app.four_steps.fingerprint
        time.sleep(2)  # its sweeper runs too: it must not decide with the wrong graph
        view = sagaline.get_saga(handle.saga_id, runtime=stack.runtime)
        assert view.status is SagaStatus.RUNNING
        assert [(s.name, s.status.value, s.attempt) for s in view.steps] == [
            ("s1", "DISPATCHED", 1),
            ("s2", "PENDING", 0),
            ("s3", "PENDING", 0),
            ("s4", "PENDING", 0),
        ]
        assert not [e for e in view.history if e.kind == "step_started"]
        assert stack.ledger(handle.saga_id) == []

        # Deploy the right code: the old worker goes, a new one comes. The refused
        # message was offered again within redispatch_after, not after a backoff.
        stack.worker.stop()
        env = {k: v for k, v in stack.env.items() if k != "SAGALINE_TEST_VARIANT"}
        with WorkerProcess(
            "tests.integration.sagas_app",
            env=env,
            concurrency=1,
            workdir=tmp_path_factory.mktemp("right-code"),
        ):
            assert handle.get(timeout=60)["s4_done"] is True
        assert [a for _, a, *_ in stack.ledger(handle.saga_id)] == ["do"] * 4
    finally:
        next(stacks, None)
