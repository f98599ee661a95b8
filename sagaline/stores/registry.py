"""Which store class a URL names, imported only when used so that extras stay optional."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ..exceptions import ConfigurationError, StoreError
from .transient import redact

if TYPE_CHECKING:
    from .base import Store

# URL scheme -> "module:Class", imported only when used so that extras stay optional.
STORE_ALIASES = {
    "memory": "sagaline.stores.memory:MemoryStore",
    "sqlite": "sagaline.stores.sql:SQLStore",
    "postgresql": "sagaline.stores.sql:SQLStore",
    "postgres": "sagaline.stores.sql:SQLStore",
    "mysql": "sagaline.stores.sql:SQLStore",
    "mariadb": "sagaline.stores.sql:SQLStore",
    "redis": "sagaline.stores.redis:RedisStore",
    "rediss": "sagaline.stores.redis:RedisStore",
}


def store_class(url: str) -> type[Store]:
    scheme = url.split(":", 1)[0].split("+", 1)[0].lower()
    try:
        target = STORE_ALIASES[scheme]
    except KeyError:
        raise ConfigurationError(
            f"unknown store URL scheme {scheme!r} in {redact(url)!r}; use one of "
            f"{sorted(STORE_ALIASES)}"
        ) from None
    module_name, cls_name = target.split(":")
    module = importlib.import_module(module_name)
    cls: type[Store] = getattr(module, cls_name)
    return cls


def store_from_url(url: str, **options: Any) -> Store:
    return store_class(url)(url, **options)  # type: ignore[call-arg]


def open_existing(url: str, **options: Any) -> Store:
    """A store for reading only: never created nor migrated; StoreError when absent."""
    store = store_from_url(url, auto_migrate=False, **options)
    try:
        present = store.exists()
    except BaseException:
        store.close()
        raise
    if not present:
        store.close()
        raise StoreError(f"no store at {redact(url)}")
    return store


def require_extra(module: str, extra: str) -> Any:
    """Import an optional dependency or say which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigurationError(
            f"{module!r} is not installed: pip install 'sagaline[{extra}]'"
        ) from None
