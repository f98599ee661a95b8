"""A broker of one of sagaline's extras whose transport cannot be imported is refused.

The refusal itself needs a venv without the redis extra: see
tests/integration/test_install.py (a Redis broker on the bare install).
"""

from __future__ import annotations

import pytest

from sagaline.extras import check_broker_transport


@pytest.mark.parametrize(
    "url",
    [
        None,
        "",
        "filesystem://",
        "memory://",
        "amqp://guest@localhost//",
        "redis://localhost:6379/0",
        "redis+socket:///tmp/redis.sock",
        ["amqp://a//", "amqp://b//"],
        "amqp://a//;amqp://b//",
    ],
)
def test_brokers_whose_transport_imports_pass(url: object) -> None:
    check_broker_transport(url)


@pytest.mark.parametrize(
    "url", ["nosuchbroker://host", "sqs://", "sagaline_missing_transport.kind://host"]
)
def test_brokers_without_a_sagaline_extra_are_left_to_celery(url: str) -> None:
    # sqs:// needs boto3 and the dotted scheme names a module that does not exist: neither
    # is sagaline's to install, so Celery reports them at first use, in its own words.
    check_broker_transport(url)
