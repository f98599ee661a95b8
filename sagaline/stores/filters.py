"""The filter and id semantics every store shares: what a filter matches, and
which ids and filter values can name a stored saga at all."""

from __future__ import annotations

from ..payload import text_problem
from ..records import SagaFilter, SagaRecord


def matches_filter(s: SagaRecord, flt: SagaFilter) -> bool:
    """The filter semantics every store implements (`status=[]` matches nothing)."""
    return (
        (flt.status is None or s.status in flt.status)
        and (flt.name is None or s.name == flt.name)
        and (flt.created_after is None or s.created_at >= flt.created_after)
        and (flt.created_before is None or s.created_at < flt.created_before)
        and (flt.parent_saga_id is None or s.parent_saga_id == flt.parent_saga_id)
        and (flt.idempotency_key is None or s.idempotency_key == flt.idempotency_key)
        and (flt.failed_step is None or s.failed_step == flt.failed_step)
        and (flt.before is None or (s.created_at, s.saga_id) < flt.before)
    )


def findable(saga_id: object) -> bool:
    """Whether `saga_id` can name a stored saga; every store asks this before a lookup.

    A non-string raises TypeError; a string that no store can hold (a NUL, a lone
    surrogate) names nothing, so every store answers "not found" alike instead of
    PostgreSQL's driver errors.
    """
    if not isinstance(saga_id, str):
        raise TypeError(f"a saga id is a string, got {type(saga_id).__name__}")
    return text_problem(saga_id) is None


def filter_matches_nothing(flt: SagaFilter | None = None, name: str | None = None) -> bool:
    """A name or parent filter that no stored saga can match (see `findable`)."""
    values = (
        [name]
        if flt is None
        else [
            flt.name,
            flt.parent_saga_id,
            flt.idempotency_key,
            flt.failed_step,
            flt.before and flt.before[1],
        ]
    )
    return any(v is not None and not findable(v) for v in values)
