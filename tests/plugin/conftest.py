"""The plugin's own tests use its fixtures as a user would; this names their app."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.plugin import shop


@pytest.fixture
def saga_apps() -> list[Any]:
    return [shop.app]


@pytest.fixture(autouse=True)
def fresh_world() -> Iterator[None]:
    shop.reset_world()
    shop.ATTEMPTS.clear()
    yield
