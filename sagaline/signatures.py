"""Which keyword arguments a callable accepts, read once from its signature.

A step's task is sent, and then called with, only the saga values its signature
names (all of them when it takes `**kwargs`): the sender filters (publishing.py)
and the worker filters again (execution.py), for senders that do not import the task.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

_SIGNATURES: dict[Any, frozenset[str] | None] = {}


def accepted_kwargs(fn: Callable[..., Any]) -> frozenset[str] | None:
    """Names a callable accepts as keywords; None when it takes **kwargs."""
    try:
        return _SIGNATURES[fn]
    except (KeyError, TypeError):
        pass
    names: set[str] = set()
    result: frozenset[str] | None
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        params = []  # type: ignore[assignment]
    for p in params:
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            result = None
            break
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
            names.add(p.name)
    else:
        result = frozenset(names)
    with contextlib.suppress(TypeError):  # unhashable callables are simply not cached
        _SIGNATURES[fn] = result
    return result


def filter_kwargs(fn: Callable[..., Any], values: Mapping[str, Any]) -> dict[str, Any]:
    accepted = accepted_kwargs(fn)
    if accepted is None:
        return dict(values)
    return {k: v for k, v in values.items() if k in accepted}
