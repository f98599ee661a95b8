"""A saga definition's fingerprint: a hash of its shape.

A worker whose definition of a saga has another fingerprint refuses to advance it;
a second definition of a name must have the fingerprint of the first. The shape is
each step's name, kind, tasks, dependencies, pivot, the code of its callables and
its child saga's fingerprint, then the result spec.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from typing import Any

from .steps import Step


def fingerprint(name: str, steps: Iterable[Step], result_spec: Any) -> str:
    """The fingerprint of a saga `name` made of `steps`, whose `get()` returns `result_spec`."""
    h = hashlib.sha256(name.encode())
    for s in steps:
        h.update("|".join(step_parts(s)).encode())
    h.update(repr(result_spec).encode())
    return h.hexdigest()[:16]


def step_parts(s: Step) -> list[str]:
    """What the fingerprint takes from one step."""
    return [
        s.name,
        s.kind,
        s.task_name or "",
        ",".join(s.depends_on),
        s.compensation_name or "",
        str(s.pivot),
        code_id(s.input),
        code_id(s.when),
        code_id(s.transform),
        s.child.fingerprint if s.child is not None else "",
    ]


def code_id(fn: Callable[..., Any] | None) -> str:
    if fn is None:
        return ""
    code = getattr(fn, "__code__", None)
    if code is None:
        return getattr(fn, "__qualname__", type(fn).__qualname__)
    return hashlib.sha256(code.co_code + repr(code.co_consts).encode()).hexdigest()[:12]
