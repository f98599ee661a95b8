"""Sagas whose steps use `sagaline.step_transaction()`, tested with the plugin: on a
SQL store saga_env and explore_failures run them (each scenario on a store of its
own, in virtual time); on the memory store the error says which option to pass."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

import sagaline
from sagaline import Saga, StepResponse, saga_step
from sagaline.outbox.events import list_events
from sagaline.stores.sql import SQLStore
from sagaline.testkit import SagaEnv, assert_completed, explore_failures
from sagaline.testkit.stores import isolated_store

app = Celery("plugin_outbox_shop", broker="memory://", set_as_current=False)
sagaline.init_app(app, store="memory://", sweeper=False)

# What the saga changes outside its store, for explore_failures' world snapshots.
LEDGER: dict[str, int] = {}


@app.task(name="outbox_shop.void")
def void(compensation_data: dict[str, Any]) -> None:
    LEDGER.pop(compensation_data["charge"], None)
    with sagaline.step_transaction() as tx:
        tx.publish("payment.voided", compensation_data)


@saga_step(compensate=void)
@app.task(name="outbox_shop.charge")
def charge(amount: int) -> StepResponse:
    key = sagaline.current_step().idempotency_key
    LEDGER[key] = amount
    with sagaline.step_transaction() as tx:
        tx.publish("payment.charged", {"charge": key, "amount": amount})
    return StepResponse(output={"charge": key}, compensation_data={"charge": key})


@app.task(name="outbox_shop.notify")
def notify(charge: str) -> None:
    with sagaline.step_transaction() as tx:
        tx.publish("payment.notified", {"charge": charge})


paid = (
    Saga("outbox_paid")
    .add_step(charge, timeout=30)
    .add_step(notify, no_compensation=True, input=lambda ctx: {"charge": ctx["charge"]})
)


@pytest.fixture(autouse=True)
def empty_ledger() -> None:
    LEDGER.clear()


@pytest.fixture
def sqlite_env(tmp_path: Path) -> Iterator[SagaEnv]:
    with isolated_store("sqlite", "sqlite", tmp_path) as store, SagaEnv([app], store=store) as env:
        yield env


def test_saga_env_on_sqlite_commits_the_events_with_the_steps_in_virtual_time(
    sqlite_env: SagaEnv,
) -> None:
    handle = sqlite_env.run(paid, amount=5)
    assert assert_completed(handle)["charge"] in LEDGER
    store = sqlite_env.store
    assert isinstance(store, SQLStore)
    with store.engine.connect() as conn:
        topics = [row.topic for row in list_events(conn)]
    assert topics == ["payment.charged", "payment.notified"]
    # The completions written in the step transactions take the runtime's (virtual)
    # clock, as every other decision does, not the wall clock.
    now = sqlite_env.clock()
    assert all(e.ts <= now for e in store.history(handle.saga_id))


def test_on_the_memory_store_the_error_names_the_option() -> None:
    with SagaEnv([app]) as env:
        handle = env.run(paid, amount=5)
        text = str(env.store.history(handle.saga_id))
    assert "--sagaline-store=sqlite" in text


def test_explore_failures_runs_each_scenario_on_a_sql_store_of_its_own() -> None:
    report = explore_failures(
        paid,
        {"amount": 5},
        world=lambda: dict(LEDGER),
        reset=LEDGER.clear,
        apps=[app],
        store="sqlite",
    )
    print(report)
    report.assert_ok()
    assert {s.status for s in report.scenarios} == {"COMPLETED", "COMPENSATED"}


def test_explore_failures_on_the_memory_store_reports_the_missing_sql_store() -> None:
    report = explore_failures(paid, {"amount": 5}, faults=[], apps=[app], store="memory")
    assert report.scenarios[0].status != "COMPLETED"
