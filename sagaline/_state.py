"""Process-global state: the saga definitions by name and the default runtime; a leaf."""

from __future__ import annotations

import sys
import weakref
from pathlib import Path
from typing import TYPE_CHECKING

from .exceptions import ConfigurationError

if TYPE_CHECKING:
    from celery import Celery

    from .definition import Saga
    from .runtime import Runtime

# A saga name belongs to the first definition that takes it; a later one with that
# name (a module imported twice) must rebuild the same steps (Saga.check_complete).
_REGISTRY: dict[str, Saga] = {}
# Every definition, so that a worker can check them all once its modules are imported.
_DEFINED: weakref.WeakSet[Saga] = weakref.WeakSet()
_PACKAGE_DIR = str(Path(__file__).resolve().parent)
# The runtime of the last app set up in this process (init_app), for code that has
# no app at hand; an app's own runtime is kept on the app.
_default_runtime: Runtime | None = None


def current_runtime(app: Celery | None = None) -> Runtime:
    """The runtime of `app`, else of Celery's current app, else the last one set up."""
    if app is None:
        from celery import current_app

        app = current_app._get_current_object()
    runtime = getattr(app, "_sagaline_runtime", None) or _default_runtime
    if runtime is None:
        raise ConfigurationError("sagaline is not set up: call sagaline.init_app(app) first")
    return runtime


def set_default_runtime(runtime: Runtime) -> None:
    global _default_runtime
    _default_runtime = runtime


def register(defn: Saga) -> Saga:
    """Record a new definition; returns the definition that owns its name."""
    _DEFINED.add(defn)
    return _REGISTRY.setdefault(defn.name, defn)


def registered_saga(name: str) -> Saga | None:
    """The saga definition registered under `name` in this process, if any."""
    return _REGISTRY.get(name)


def registered_sagas() -> list[Saga]:
    """The saga definitions that own a name in this process."""
    return list(_REGISTRY.values())


def definitions() -> list[Saga]:
    """Every definition of this process still referenced, owners of a name or not."""
    return list(_DEFINED)


def forget(defn: Saga) -> None:
    """Drop a definition that failed while being defined, so that it owns no name."""
    if _REGISTRY.get(defn.name) is defn:
        del _REGISTRY[defn.name]
    _DEFINED.discard(defn)


def defined_at() -> str:
    """`file:line` of the user code that is defining a saga (for error messages)."""
    frame = sys._getframe(1)
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame = frame.f_back
    return f"{frame.f_code.co_filename}:{frame.f_lineno}"
