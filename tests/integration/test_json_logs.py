"""JSON logs of a real worker, and the spans its warm shutdown exports.

Every line is one JSON object; a user's record inside a step carries the step and
its span, sagaline's own records about a saga (a refused duplicate claim) carry the
saga. The worker's batch delay is longer than the test: its spans reach the receiver
only because a warm shutdown (SIGTERM) flushes every process's spans.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sagaline import SagaCompensated
from sagaline.observability.logs import FIELDS
from sagaline.publishing import send_step
from sagaline.records import Dispatch
from sagaline.states import Phase
from tests.harness import WorkerProcess
from tests.integration import traced_app
from tests.integration.otlp import (
    WAIT,
    Receiver,
    Traced,
    json_records,
    saga_fields,
    serve_otlp,
    traced_client,
)

APP = "tests.integration.traced_app"


@pytest.fixture(scope="module")
def traced(redis_url: str) -> Iterator[Traced]:
    with serve_otlp() as receiver, traced_client(receiver, redis_url) as client:
        yield client


def test_json_logs_carry_the_saga_of_user_and_sagaline_records_and_a_warm_stop_exports_spans(
    traced: Traced, worker_factory: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    logfile = tmp_path / "worker-json.log"
    worker = worker_factory(
        APP,
        # Spans wait for a batch for ten minutes: only a flush exports them in this test.
        env={**traced.env, "SAGALINE_LOG_FORMAT": "json", "OTEL_BSP_SCHEDULE_DELAY": "600000"},
        concurrency=2,
        extra_args=["--logfile", str(logfile)],
    )
    order = "o-json-" + uuid.uuid4().hex[:6]
    handle = traced.runtime.start_saga(traced_app.compensated, {"order_id": order})
    with pytest.raises(SagaCompensated):
        handle.get(timeout=WAIT)
    # A duplicate of a message the worker has run: its claim is refused.
    duplicate = Dispatch(
        handle.saga_id,
        "traced_compensated",
        traced_app.compensated.fingerprint,
        "reserve",
        Phase.FORWARD,
        1,
        "traced.reserve",
        {"order_id": order},
    )
    send_step(traced.runtime.app, duplicate, None)
    deadline = time.monotonic() + WAIT
    while "claim refused" not in logfile.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    rx: Receiver = traced.receiver
    assert rx.with_saga(handle.saga_id) == []  # nothing exported before the stop
    worker.stop()  # SIGTERM: a warm shutdown; every process has written its last line

    # The warm shutdown exported every span the pool processes held.
    root = rx.root_of(handle.saga_id, "traced_compensated")
    spans = rx.of_trace(root.trace_id)
    attempts = {s.name for s in spans if s.parent_id == root.span_id}
    assert attempts == {
        "step reserve",
        "step charge",
        "step ship",
        "compensate charge",
        "compensate reserve",
    }
    user_span = next(s for s in spans if s.name == "reserve stock")

    records = json_records(logfile.read_text())
    assert len(records) > 5
    for r in records:
        assert set(FIELDS) <= set(r), r
    mine = [r for r in records if r["message"] == f"reserving stock for {order}"]
    assert len(mine) == 1, [r["message"] for r in records]
    line = mine[0]
    assert (line["logger"], line["level"]) == ("shop.steps", "INFO")
    assert saga_fields(line) == (handle.saga_id, "traced_compensated", "reserve", 1, "forward")
    # Logged inside the user's span "reserve stock", in the saga's trace.
    assert (line["trace_id"], line["span_id"]) == (user_span.trace_id, user_span.span_id)
    # A compensation's record carries its phase; Celery's own records are JSON too.
    refund = [r for r in records if r["message"].startswith("refunding")]
    assert [(r["step"], r["phase"]) for r in refund] == [("charge", "compensate")]
    assert any(r["logger"].startswith("celery") for r in records)
    outside = [r for r in records if r["logger"].startswith("celery.worker")]
    assert outside and all(r["saga_id"] is None for r in outside)
    # sagaline's own record of the refused duplicate, logged outside any step body.
    refused = [r for r in records if "claim refused" in r["message"]]
    assert [(r["logger"], saga_fields(r)) for r in refused] == [
        ("sagaline", (handle.saga_id, "traced_compensated", "reserve", 1, "forward"))
    ]
