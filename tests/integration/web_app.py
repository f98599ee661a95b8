"""The Celery app of the web tests: the robot fleet's, and two sagas of their own.

`web_graph` is a diamond (prepare -> left, right -> finish) whose steps return long
outputs. In `web_fragile` the step `charge` fails for good, and the compensation of
`reserve` fails while the file named by the input's `fixed` does not exist: the saga
ends FAILED, needing attention, until an operator creates the file and resumes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sagaline
from sagaline import Retry, Saga, StepResponse
from sagaline.demo.robots.app import app

__all__ = ["app"]

# A long output, as real services return: the steps table must keep it readable.
REPORT = {
    "summary": "inventory reserved in every warehouse of the region " * 4,
    "warehouses": [{"id": f"wh-{i:02d}", "units": i * 7, "bin": f"aisle {i}"} for i in range(12)],
}


@app.task(name="web_test.work")
def work(saga_id: str, fail: str | None = None, **ctx: Any) -> StepResponse:
    step = sagaline.current_step().step
    if step == fail:
        raise RuntimeError(f"{step} failed on purpose: card declined")
    return StepResponse(
        output={f"{step}_report": {"step": step, **REPORT}},
        compensation_data={"step": step},
    )


@app.task(name="web_test.undo")
def undo(compensation_data: Any, fixed: str | None = None, **ctx: Any) -> None:
    if fixed is not None and not Path(fixed).exists():
        raise ConnectionError(
            f"undo of {compensation_data['step']} refused: the ledger is locked "
            f"(create {fixed} to unlock it)"
        )


web_graph = (
    Saga("web_graph")
    .add_step(work, name="prepare", compensate=undo)
    .add_step(work, name="left", compensate=undo, depends_on=["prepare"])
    .add_step(work, name="right", compensate=undo, depends_on=["prepare"])
    .add_step(work, name="finish", compensate=undo, depends_on=["left", "right"])
)

web_fragile = (
    Saga("web_fragile")
    .add_step(
        work,
        name="reserve",
        compensate=undo,
        compensation_retry=Retry(max_attempts=2, backoff=0.1),
    )
    .add_step(work, name="charge", compensate=undo)
)
