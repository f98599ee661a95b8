"""Sagas with hostile failures and undeliverable messages, for test_poison_and_failures.

Imported by the worker through the app's `include` and by the tests themselves.
"""

from __future__ import annotations

from typing import Any

from sagaline import Saga
from tests.integration.sagas_app import app, s1

# What the step of `hostile_failure` raises, by the `kind` in its input.
HOSTILE_MESSAGES = {
    "nul": "bad\x00byte",
    "lone_surrogate": "half a character: \ud800",
    "huge": "x" * 1_000_000,
}


@app.task(name="t.raise_hostile")
def raise_hostile(kind: str) -> None:
    raise RuntimeError(HOSTILE_MESSAGES[kind])


@app.task(name="t.always_fails")
def always_fails() -> None:
    raise ConnectionError("first attempt fails")


@app.task(name="t.big")
def big(x: str) -> dict[str, Any]:
    return {"size": len(x)}


hostile_failure = Saga("hostile_failure").add_step(s1).add_step(raise_hostile, no_compensation=True)

# No worker registers this task.
unregistered_step = (
    Saga("unregistered_step").add_step(s1).add_step("t.nobody_has_this", no_compensation=True)
)

# Its second step goes to a queue no worker consumes: tests send their own copy of
# that step's message (undecodable, or of a refused content type) to the worker.
parked_step = (
    Saga("parked_step")
    .add_step(s1)
    .add_step(big, no_compensation=True, queue="nobody_consumes_this")
)

big_input = Saga("big_input").add_step(big, no_compensation=True)
