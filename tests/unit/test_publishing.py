"""How sagaline publishes: publisher confirms on RabbitMQ, retries sent when due."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from celery import Celery

import sagaline
from sagaline.records import Dispatch
from sagaline.runtime import DelayedPublisher
from sagaline.states import Phase


@pytest.mark.parametrize("url", ["amqp://guest@localhost//", "pyamqp://guest@localhost//"])
def test_init_app_turns_on_publisher_confirms_for_rabbitmq(url: str) -> None:
    app = Celery("confirms", broker=url)
    app.conf.broker_transport_options = {"max_retries": 2}
    sagaline.init_app(app, store="memory://", sweeper=False)
    assert app.conf.broker_transport_options == {"max_retries": 2, "confirm_publish": True}


def test_init_app_keeps_the_users_confirm_choice() -> None:
    app = Celery("confirms", broker="amqp://guest@localhost//")
    app.conf.broker_transport_options = {"confirm_publish": False}
    sagaline.init_app(app, store="memory://", sweeper=False)
    assert app.conf.broker_transport_options == {"confirm_publish": False}


@pytest.mark.parametrize("url", ["redis://127.0.0.1:1/0", "sqs://"])
def test_init_app_leaves_other_brokers_alone(url: str) -> None:
    # sqs:// needs boto3, which may be missing: init_app must not fail for that.
    app = Celery("confirms", broker=url)
    sagaline.init_app(app, store="memory://", sweeper=False)
    assert "confirm_publish" not in (app.conf.broker_transport_options or {})


def _dispatch(step: str, countdown: float) -> Dispatch:
    return Dispatch("s-1", "saga", "fp", step, Phase.FORWARD, 2, "t.step", {}, countdown=countdown)


def test_delayed_messages_are_published_when_due_in_due_order() -> None:
    sent: list[tuple[str, float]] = []
    done = threading.Event()
    started = time.monotonic()

    def publish(d: Dispatch) -> None:
        sent.append((d.step, time.monotonic() - started))
        if len(sent) == 3:
            done.set()

    delayed = DelayedPublisher(publish)
    delayed.add(_dispatch("late", 0.6))
    delayed.add(_dispatch("early", 0.2))
    delayed.add(_dispatch("middle", 0.4))
    assert delayed.pending() == 3 and sent == []
    assert done.wait(5), sent
    assert [s for s, _ in sent] == ["early", "middle", "late"]
    for (_, at), due in zip(sent, (0.2, 0.4, 0.6), strict=True):
        assert due <= at < due + 0.25, sent
    assert delayed.pending() == 0


def test_a_step_sent_from_a_running_task_keeps_its_reply_to_and_names_no_thread() -> None:
    # Like the next task of a Celery chain. Naming the thread (Celery's thread_oid,
    # kombu's uuid3) would hash with MD5 and load OpenSSL's code into every pool process.
    from celery._state import _task_stack
    from celery.signals import before_task_publish

    from sagaline.publishing import send_step

    app = Celery("reply", broker="memory://")

    @app.task(name="t.step")
    def step(saga_id: str = "") -> None:
        return None

    seen: list[Any] = []

    def record(properties: dict[str, Any] | None = None, **_: Any) -> None:
        seen.append((properties or {}).get("reply_to"))

    before_task_publish.connect(record, weak=False)
    step.push_request(id="running", reply_to="caller-oid", called_directly=False)
    _task_stack.push(step)
    try:
        send_step(app, _dispatch("a", 0.0), None)
    finally:
        _task_stack.pop()
        step.pop_request()
        before_task_publish.disconnect(record)
    assert seen == ["caller-oid"]
    assert not hasattr(app._local, "oid")


def test_a_step_message_shows_its_arguments_without_celerys_saferepr() -> None:
    from celery.signals import before_task_publish
    from celery.utils.saferepr import saferepr

    from sagaline.publishing import flat_repr, send_step

    app = Celery("reprs", broker="memory://")

    @app.task(name="t.reprs", shared=False)
    def step(saga_id: str = "", order: Any = None, note: str = "") -> None:
        return None

    seen: list[tuple[str, str]] = []

    def record(headers: dict[str, Any] | None = None, **_: Any) -> None:
        seen.append(((headers or {})["argsrepr"], (headers or {})["kwargsrepr"]))

    flat = {"saga_id": "s-1", "note": "n" * 600, "order": 7}
    long = {"saga_id": "s-1", "note": "n" * 2000}
    nested = {"saga_id": "s-1", "order": {"lines": [{"sku": "a", "qty": 2}] * 400}}
    before_task_publish.connect(record, weak=False)
    try:
        for kwargs in (flat, long, nested):
            d = Dispatch("s-1", "saga", "fp", "a", Phase.FORWARD, 1, "t.reprs", kwargs)
            send_step(app, d, None)
    finally:
        before_task_publish.disconnect(record)
    assert [a for a, _ in seen] == ["()", "()", "()"]
    limit = app.amqp.kwargsrepr_maxsize
    assert seen[0][1] == repr(flat)
    # Not flat, or a string past the limit: left to Celery's saferepr, which stops there.
    for kwargs, (_, shown) in zip((long, nested), seen[1:], strict=True):
        assert shown == saferepr(kwargs, limit, maxlevels=app.conf.task_repr_maxlevels)
    assert len(repr({"a": "x" * 1020, "b": 1})) > limit
    cut = flat_repr({"a": "x" * 1020, "b": 1}, limit)
    assert cut is not None and len(cut) == limit and cut.endswith("...")
