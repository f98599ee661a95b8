"""State stores behind one contract; pick one by URL with `store_from_url`."""

from __future__ import annotations

from .base import Store
from .registry import store_from_url

__all__ = ["Store", "store_from_url"]
