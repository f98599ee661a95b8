"""What the Redis store publishes when a saga ends (redis_layout.py's `ended_message`),
and how a listener decodes it: as a read decodes the saga's hash."""

from __future__ import annotations

import pytest

from sagaline.records import SagaRecord
from sagaline.states import SagaStatus
from sagaline.stores.redis_layout import (
    ENDED_MAX_BYTES,
    Layout,
    decode_ended,
    ended_message,
    fields,
    saga_record,
)


def ended(output: object) -> SagaRecord:
    return SagaRecord(
        "s-1", "n", SagaStatus.COMPLETED, {"x": 1}, "f", 1.0, 2.0, output=output, finished_at=2
    )


def test_a_listener_decodes_the_ended_saga_as_a_read_decodes_its_hash() -> None:
    saga = ended({"z": 1, "a": [1.5, "é ✓", None], "m": {"y": 2}})
    written = fields(saga, version=5)
    message = ended_message(saga.saga_id, written)
    assert message is not None
    saga_id, record = decode_ended(message)
    read = saga_record(dict(zip(written[::2], written[1::2], strict=True)))  # HGETALL's
    assert saga_id == "s-1"
    assert repr(record()) == repr(read)
    assert record().version == 5
    assert list(record().output) == ["z", "a", "m"]


def test_a_saga_too_large_for_a_message_is_announced_by_its_id_alone() -> None:
    small, large = ended("x" * 10), ended("x" * ENDED_MAX_BYTES)
    assert ended_message("s-1", fields(small)) is not None
    assert ended_message("s-1", fields(large)) is None


def test_a_message_without_a_saga_is_refused() -> None:
    with pytest.raises(ValueError):
        decode_ended("s-1")


def test_the_ended_channel_is_the_stores_own() -> None:
    assert Layout("a").ended_channel() == "a:ended"
    assert Layout("a").ended_channel() != Layout("b").ended_channel()
    assert Layout("a").ended_channel() != Layout("a").finished_channel()
