"""The functional API: `@saga("name")` traces a function of `step(...)` calls into a DAG.

The function runs once, at definition time, with placeholders instead of
values. `step(task, ref, ...)` records a step that depends on the steps whose
results it is given, so independent steps run in parallel by themselves. The
placeholders refuse to be used as Python values (`if ref:`, `for x in ref`,
arithmetic): their values exist only later, in the workers.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from .definition import Parallel, Saga, forget, short_name
from .exceptions import DefinitionError
from .steps import ContextFn, Retry, TaskRef

_RULE = (
    "step results are placeholders while the saga is traced at definition time, so {what} "
    "cannot work on them. Pass results to step()/transform() only; decide in the engine "
    "with add_step(..., when=lambda ctx: ...) or use the builder: "
    "Saga(name).add_step(task, when=...)"
)


class _Tracer:
    def __init__(self, saga: Saga):
        self.saga = saga


_active: list[_Tracer] = []


def _tracer(what: str) -> _Tracer:
    if not _active:
        raise DefinitionError(f"{what}() is only allowed inside a function decorated with @saga")
    return _active[-1]


class Ref:
    """A placeholder for a step's result (or a key of it) while a saga is traced."""

    __slots__ = ("_key", "_step")

    def __init__(self, step: str | None, key: str | None = None):
        self._step = step  # None: the saga's input
        self._key = key

    def __getitem__(self, key: str) -> Ref:
        if not isinstance(key, str):
            raise DefinitionError(f"project a step result with a string key, not {key!r}")
        if self._key is not None:
            raise DefinitionError("nested projections (ref['a']['b']) are not supported")
        return Ref(self._step, key)

    def _refuse(self, what: str) -> Any:
        where = "the saga input" if self._step is None else f"the result of step {self._step!r}"
        raise DefinitionError(
            f"{where} used as a Python value: " + _RULE.format(what=what), step=self._step
        )

    def __bool__(self) -> bool:
        return bool(self._refuse("`if`/`while`/`and`/`or`"))

    def __iter__(self) -> Any:
        return self._refuse("`for` loops and unpacking")

    def __len__(self) -> int:
        return int(self._refuse("len()"))

    def __contains__(self, item: Any) -> bool:
        return bool(self._refuse("`in`"))

    def __index__(self) -> int:
        return int(self._refuse("indexing with it"))

    def __format__(self, spec: str) -> str:
        return str(self._refuse("string formatting"))

    def __repr__(self) -> str:
        target = "input" if self._step is None else self._step
        return f"<result of {target}{'' if self._key is None else f'[{self._key!r}]'}>"


def _arith(name: str) -> Callable[..., Any]:
    def refuse(self: Ref, *_: Any) -> Any:
        return self._refuse(f"arithmetic and comparisons ({name})")

    return refuse


for _op in (
    "add",
    "sub",
    "mul",
    "truediv",
    "floordiv",
    "mod",
    "pow",
    "neg",
    "pos",
    "abs",
    "radd",
    "rsub",
    "rmul",
    "rtruediv",
    "lt",
    "le",
    "gt",
    "ge",
    "int",
    "float",
    "round",
    "invert",
    "and",
    "or",
    "xor",
):
    setattr(Ref, f"__{_op}__", _arith(_op))


def step(
    task: TaskRef | Saga,
    *refs: Any,
    name: str | None = None,
    compensate: TaskRef | None = None,
    no_compensation: bool = False,
    retry: Retry | None = None,
    compensation_retry: Retry | None = None,
    timeout: float | None = None,
    when: ContextFn | None = None,
    pivot: bool = False,
    queue: str | None = None,
    **kwargs: Any,
) -> Ref:
    """Add a step that runs after the steps whose results are passed to it.

    Keyword arguments map step parameters to results: `amount=order["total"]` passes
    that key of the context; other keyword values are constants.
    """
    tracer = _tracer("step")
    deps = _dependencies(refs, kwargs)
    mapper = _mapper(kwargs) if kwargs else None
    if isinstance(task, Saga):
        if mapper is not None:
            raise DefinitionError(
                "keyword inputs are not supported for child sagas", saga=tracer.saga.name, step=name
            )
        tracer.saga.add_saga(task, name=name, depends_on=deps, when=when)
    else:
        tracer.saga.add_step(
            task,
            name=_unique(tracer, name, task),
            compensate=compensate,
            no_compensation=no_compensation,
            depends_on=deps,
            input=mapper,
            retry=retry,
            compensation_retry=compensation_retry,
            timeout=timeout,
            when=when,
            pivot=pivot,
            queue=queue,
        )
    return Ref(tracer.saga.steps[-1].name)


def transform(
    fn: Callable[[dict[str, Any]], dict[str, Any]], *refs: Any, name: str | None = None
) -> Ref:
    """A context transform after the given results: `fn(ctx) -> ctx`, run by the engine."""
    tracer = _tracer("transform")
    tracer.saga.add_transform(fn, name=name, depends_on=_dependencies(refs, {}))
    return Ref(tracer.saga.steps[-1].name)


def parallelize(*items: Any) -> Any:
    """Steps that run at once: in the builder `add_step(parallelize(a, b))` is
    `add_parallel(a, b)`; inside `@saga`, the step results are returned as a tuple."""
    if _active:
        return tuple(items)
    return Parallel(items)


def _dependencies(refs: tuple[Any, ...], kwargs: dict[str, Any]) -> list[str]:
    """Steps whose results are passed: positionally (results only, or lists/dicts of
    them) or as keyword values (where anything else is a constant)."""
    deps: list[str] = []

    def add(item: Any) -> None:
        if isinstance(item, Ref) and item._step is not None and item._step not in deps:
            deps.append(item._step)

    for r in refs:
        items = (
            list(r.values())
            if isinstance(r, dict)
            else (list(r) if isinstance(r, (list, tuple)) else [r])
        )
        for item in items:
            if not isinstance(item, Ref):
                raise DefinitionError(
                    f"step() takes step results as positional arguments, got {item!r}; pass "
                    f"constants as keyword arguments or in the saga input"
                )
            add(item)
    for value in kwargs.values():
        add(value)
    return deps


def _mapper(kwargs: dict[str, Any]) -> ContextFn:
    def mapped(ctx: dict[str, Any]) -> dict[str, Any]:
        out = dict(ctx)
        for param, value in kwargs.items():
            if isinstance(value, Ref):
                if value._key is not None:
                    out[param] = ctx.get(value._key)
                elif value._step is not None:
                    out[param] = ctx.get(value._step)
            else:
                out[param] = value
        return out

    return mapped


def _unique(tracer: _Tracer, name: str | None, task: TaskRef) -> str | None:
    if name is not None:
        return name
    base = short_name(task if isinstance(task, str) else str(task.name))
    taken = {s.name for s in tracer.saga.steps}
    if base not in taken:
        return base
    n = 2
    while f"{base}_{n}" in taken:
        n += 1
    return f"{base}_{n}"


def saga(name: str, **options: Any) -> Callable[[Callable[..., Any]], Saga]:
    """Define a saga by a function of `step(...)` calls, traced once, now."""

    def decorate(fn: Callable[..., Any]) -> Saga:
        definition = Saga(name, **options)
        tracer = _Tracer(definition)
        _active.append(tracer)
        try:
            try:
                returned = fn(Ref(None))
            finally:
                _active.pop()
            definition.set_result(_result_spec(name, returned))
            # Traced: the definition is complete now, at import (not empty, and the
            # same as any other definition of this name).
            definition.check_complete()
        except DefinitionError as exc:
            forget(definition)  # a fixed definition may take the name afterwards
            if exc.saga is None:
                raise DefinitionError(exc.detail, saga=name, step=exc.step) from None
            raise
        except BaseException:
            forget(definition)
            raise
        functools.update_wrapper(definition, fn, updated=())  # type: ignore[arg-type]
        return definition

    return decorate


def _result_spec(name: str, returned: Any) -> Any:
    if returned is None:
        return None
    if isinstance(returned, Ref):
        return _ref_spec(returned)
    if isinstance(returned, dict):
        return {str(k): _ref_spec(v) for k, v in returned.items()}
    raise DefinitionError(
        "a @saga function returns a step result, a dict of them, or "
        f"nothing; got {type(returned).__name__}",
        saga=name,
    )


def _ref_spec(ref: Any) -> list[str | None]:
    if not isinstance(ref, Ref):
        raise DefinitionError(f"the saga result must be made of step results, got {ref!r}")
    return [ref._step, ref._key]
