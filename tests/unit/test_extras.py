"""A broker URL whose kombu transport cannot be imported is refused, naming what is missing.

The Redis case itself needs a venv without the redis extra: see
tests/integration/test_install.py.
"""

from __future__ import annotations

import pytest

from sagaline.exceptions import ConfigurationError
from sagaline.extras import check_broker_transport


@pytest.mark.parametrize("url", [None, "", "filesystem://", "memory://",
                                 "amqp://guest@localhost//", "redis://localhost:6379/0",
                                 "redis+socket:///tmp/redis.sock",
                                 ["amqp://a//", "amqp://b//"], "amqp://a//;amqp://b//"])
def test_brokers_whose_transport_imports_pass(url: object) -> None:
    check_broker_transport(url)


def test_a_scheme_kombu_does_not_know_is_left_to_kombu() -> None:
    check_broker_transport("nosuchbroker://host")


def test_a_transport_that_cannot_be_imported_is_a_configuration_error() -> None:
    # A dotted scheme is imported as a module path by kombu: this one does not exist.
    with pytest.raises(ConfigurationError) as info:
        check_broker_transport("sagaline_missing_transport.kind://host")
    assert str(info.value) == ("the sagaline_missing_transport.kind:// broker needs "
                               "'sagaline_missing_transport', which is not installed: "
                               "install what kombu needs")
