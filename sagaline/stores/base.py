"""The store contract: a few atomic operations, and the semantics every store shares.

A store keeps three things: sagas, their steps, and an append-only history.
Writes are either a single compare-and-set on one step (`claim_step`,
`renew_lease`) or a read-modify-write of one saga (`transact`). Two `transact`
calls on the same saga are serialized — the engine decides on a snapshot that
no other `transact` can change before the decision is written (SQL: the saga
row lock; Redis: a per-saga transaction counter; memory: one lock) — and the
decision is written only if every record it changes still has the version that
was read, so a claim that slipped in is never overwritten. Serializing is not
optional: two parallel branches that finish together must see each other, or
neither would start the step that joins them. No store ever rewrites a whole
saga document per step.
"""

from __future__ import annotations

import random
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

from ..exceptions import ConcurrencyError
from ..records import Decision, Event, Owner, SagaFilter, SagaRecord, SagaState, StepRecord
from ..states import Phase, SagaStatus
from .filters import filter_matches_nothing, findable
from .filters import matches_filter as matches_filter
from .finished import FinishWatch
from .retention import (
    DEFAULT_GC_BATCH,
    DEFAULT_GC_STATUSES,
    GcRemoved,
    GcReport,
    GcRule,
    GcTree,
    gather_trees,
)
from .sanitize import storable_records
from .transient import redact as redact
from .transient import retry_transient

Decide = Callable[[SagaState], "Decision | None"]
T = TypeVar("T")

# Transient failures (a restarting server, a dropped connection, a locked SQLite
# file) are retried for this long before the operation fails with StoreError.
DEFAULT_RETRY_FOR = 30.0
# A transact that keeps losing its compare-and-set to concurrent writers gives up
# after this many decisions; a short random pause between them spreads the writers out.
MAX_DECISIONS = 20


@dataclass(frozen=True)
class Snapshot:
    """A saga read under its lock, and how to write a decision made on it.

    `write` is a compare-and-set on the versions the decision was made on (and,
    per store, whatever stands for the saga lock): False means another writer
    won, nothing was written, and the caller must read again and decide again.
    """

    state: SagaState
    write: Callable[[Decision], bool]


@dataclass(frozen=True)
class DueItem:
    """Work the sweeper must look at: a saga (step None) or one of its steps."""

    saga_id: str
    step: str | None
    due_at: float


class Store(ABC):
    """What every state store provides. Implementations: memory, sql, redis.

    The base owns the contract's semantics: the decide-again loop of `transact`,
    the batches of `gc`, `storable_records` on everything written, the id and filter
    guards, and the retry of transient failures. A store supplies primitives:
    `_locked` (one read for a decision, and its compare-and-set write), `_insert_saga`,
    the `_`-prefixed reads, the `_gc_` steps, and the single-row compare-and-sets
    `claim_step` and `renew_lease` (which choose their fields through `PHASE_COLUMNS`).
    """

    url: str = ""
    retry_for: float = DEFAULT_RETRY_FOR
    # The exceptions of a store's client that may be transient; `_is_transient` tells.
    _retry_errors: tuple[type[BaseException], ...] = ()

    def _is_transient(self, exc: BaseException) -> bool:
        return True

    def _retrying(self, fn: Callable[[], T]) -> T:
        """Run `fn`, waiting out transient failures for `retry_for` seconds."""
        return retry_transient(
            fn,
            url=self.url,
            retry_for=self.retry_for,
            errors=self._retry_errors,
            transient=self._is_transient,
        )

    def create_saga(self, state: SagaState, events: list[Event]) -> tuple[SagaRecord, bool]:
        """Insert a saga with its steps and events in one transaction.

        When another saga with the same name and idempotency key exists, insert
        nothing and return that one with `False`.
        """
        storable_records(state.saga, state.steps.values(), events)
        return self._insert_saga(state, events)

    @abstractmethod
    def _insert_saga(self, state: SagaState, events: list[Event]) -> tuple[SagaRecord, bool]:
        """`create_saga` on records already made storable."""

    @abstractmethod
    def claim_step(
        self,
        saga_id: str,
        step: str,
        phase: Phase,
        attempt: int,
        *,
        lease_until: float,
        now: float,
        owner: Owner | None = None,
    ) -> bool:
        """Atomically move the step (or its compensation) from DISPATCHED(attempt) to RUNNING.

        Records `owner` (all three owner fields; None clears them) with the claim and
        appends the `started` event in the same transaction. False when the claim
        fails (a duplicate, a stale attempt, a cancelled step): run nothing then.
        """

    @abstractmethod
    def renew_lease(
        self, saga_id: str, step: str, phase: Phase, attempt: int, lease_until: float
    ) -> bool:
        """Extend the lease of a RUNNING claim; False when the claim is no longer ours."""

    def transact(self, saga_id: str, decide: Decide) -> Decision | None:
        """Read the saga under its lock, let `decide` choose, write its decision atomically.

        Retries `decide` on a fresh read when a compare-and-set loses a race.
        Returns the decision that was written (None when `decide` chose nothing).
        """
        if not findable(saga_id):
            return None
        for n in range(MAX_DECISIONS):
            done, decision = self._retrying(lambda: self._decide_once(saga_id, decide))
            if done:
                return decision
            # Lost a race (a claim, a renewal, another completion of this saga).
            time.sleep(random.uniform(0, min(0.002 * 2**n, 0.05)))
        raise ConcurrencyError(f"saga {saga_id!r}: too many concurrent updates")

    def _decide_once(self, saga_id: str, decide: Decide) -> tuple[bool, Decision | None]:
        """One read-decide-write; (False, None) when the compare-and-set lost."""
        with self._locked(saga_id) as snapshot:
            if snapshot is None:
                return True, None
            decision = decide(snapshot.state)
            if decision is None or not decision.changed:
                return True, decision
            storable_records(decision.saga, decision.steps, decision.events)
            if not snapshot.write(decision):
                return False, None
            return True, decision

    @abstractmethod
    def _locked(self, saga_id: str) -> AbstractContextManager[Snapshot | None]:
        """The saga read for one decision (None: no such saga), serialized with others.

        SQL and memory hold the saga's lock until the context exits, so that no
        other transact of the saga writes in between; Redis holds none, and its
        `write` loses instead when another transact wrote the saga since the read.
        """

    def get_saga(self, saga_id: str) -> SagaRecord | None:
        if not findable(saga_id):
            return None
        return self._get_saga(saga_id)

    @abstractmethod
    def _get_saga(self, saga_id: str) -> SagaRecord | None: ...

    def get_steps(self, saga_id: str) -> list[StepRecord]:
        """The saga's steps in topological order."""
        if not findable(saga_id):
            return []
        return self._get_steps(saga_id)

    def read_state(self, saga_id: str) -> SagaState | None:
        """The saga with all its steps (None: no such saga): what ops and the runtime read.

        Two reads by default, the saga then its steps; they agree except while a
        `transact` commits between them, which a reader outside the saga's lock
        accepts. A store that can read both at once cheaply does so here.
        """
        saga = self.get_saga(saga_id)
        if saga is None:
            return None
        return SagaState(saga, {s.name: s for s in self.get_steps(saga_id)})

    @abstractmethod
    def _get_steps(self, saga_id: str) -> list[StepRecord]: ...

    def steps_of(self, saga_ids: list[str]) -> dict[str, list[StepRecord]]:
        """The steps of several sagas (a list's FAILED ones), each in topological order;
        a saga without steps, or unknown, has none in the result."""
        found = [sid for sid in dict.fromkeys(saga_ids) if findable(sid)]
        return {sid: rows for sid, rows in self._steps_of(found).items() if rows}

    def _steps_of(self, saga_ids: list[str]) -> dict[str, list[StepRecord]]:
        """`steps_of` on findable ids; one read per saga unless a store does better."""
        return {sid: self._get_steps(sid) for sid in saga_ids}

    def history(self, saga_id: str, *, after_seq: int = 0, limit: int | None = None) -> list[Event]:
        """The saga's events after `after_seq` in the order they were appended; only the
        oldest `limit` of them when given, read as such (a long history is not read whole)."""
        if not findable(saga_id) or (limit is not None and limit <= 0):
            return []
        return self._history(saga_id, after_seq, limit)

    @abstractmethod
    def _history(self, saga_id: str, after_seq: int, limit: int | None) -> list[Event]: ...

    def history_tail(
        self, saga_id: str, *, limit: int, before_seq: int | None = None
    ) -> list[Event]:
        """The newest `limit` events of the saga (those before `before_seq`, if given),
        oldest first: a bounded read of a long history, newest end first."""
        if not findable(saga_id) or limit <= 0 or (before_seq is not None and before_seq <= 1):
            return []
        return self._history_tail(saga_id, limit, before_seq)

    def _history_tail(self, saga_id: str, limit: int, before_seq: int | None) -> list[Event]:
        """`history_tail` from the whole history, unless a store does better."""
        events = [
            e
            for e in self._history(saga_id, 0, None)
            if before_seq is None or (e.seq or 0) < before_seq
        ]
        return events[-limit:]

    def list_sagas(self, flt: SagaFilter) -> list[SagaRecord]:
        """Sagas matching the filter, newest first."""
        if filter_matches_nothing(flt):
            return []
        return self._list_sagas(flt)

    @abstractmethod
    def _list_sagas(self, flt: SagaFilter) -> list[SagaRecord]: ...

    def count_by_status(self, name: str | None = None) -> dict[SagaStatus, int]:
        if filter_matches_nothing(name=name):
            return dict.fromkeys(SagaStatus, 0)
        return self._count_by_status(name)

    @abstractmethod
    def _count_by_status(self, name: str | None) -> dict[SagaStatus, int]: ...

    @abstractmethod
    def find_due(self, now: float, limit: int = 200) -> list[DueItem]:
        """Sagas and steps whose `due_at` has passed: O(due work) through an index."""

    @abstractmethod
    def find_claimed(self, node: str, limit: int = 200) -> list[StepRecord]:
        """RUNNING steps and compensations claimed by a process of Celery node `node`.

        O(claims in flight on that node) through an index, not O(history): the
        worker's main process calls it every sweep to find claims of dead processes.
        """

    def gc(
        self,
        cutoff: float,
        *,
        statuses: Iterable[SagaStatus | str] = DEFAULT_GC_STATUSES,
        name: str | None = None,
        dry_run: bool = False,
        batch_size: int = DEFAULT_GC_BATCH,
        max_batches: int | None = None,
        after: str | None = None,
    ) -> GcReport:
        """Delete the saga trees (retention.py) finished before `cutoff`, with their steps,
        events, index entries and idempotency keys: `batch_size` roots per transaction,
        each re-checked where it is deleted. `dry_run` counts instead of deleting. A run
        cut short by `max_batches` reports a `cursor`, which `after` continues from."""
        rule = GcRule.of(cutoff, statuses, batch_size, name)
        report = GcReport(rule.cutoff, dry_run, sorted(rule.statuses))
        if filter_matches_nothing(name=name):
            return report
        cursor, prepared = after, dry_run
        while max_batches is None or report.batches < max_batches:
            page = partial(self._gc_candidates, rule, name, batch_size, cursor)
            roots, cursor = self._retrying(page)
            if roots and not prepared:  # once per run, and only by a run that may delete
                rule, prepared = self._retrying(partial(self._gc_prepare, rule)), True
            report.add(self._retrying(partial(self._gc_apply, roots, rule, dry_run)), len(roots))
            if cursor is None:
                if not dry_run:
                    report.partitions = self._retrying(partial(self._gc_finish, rule))
                return report
        report.cursor = cursor
        return report

    def _gc_apply(
        self, roots: list[tuple[str, SagaStatus]], rule: GcRule, dry_run: bool
    ) -> GcRemoved:
        """One batch: the trees of `roots` whose every saga is finished, counted or deleted."""
        trees = [t for t in gather_trees(roots, self._gc_children) if t.finished]
        if not trees:
            return GcRemoved()
        return self._gc_count(trees) if dry_run else self._gc_delete(trees, rule)

    @abstractmethod
    def _gc_candidates(
        self, rule: GcRule, name: str | None, limit: int, after: str | None
    ) -> tuple[list[tuple[str, SagaStatus]], str | None]:
        """Up to `limit` roots (no parent, or a parent gone) that `rule` accepts, with their
        status, from this store's cursor `after`; and the next page's cursor (None: no more)."""

    @abstractmethod
    def _gc_children(self, ids: list[str]) -> list[tuple[str, str, SagaStatus]]:
        """(parent id, child id, child's status) of every child saga of `ids`."""

    @abstractmethod
    def _gc_count(self, trees: list[GcTree]) -> GcRemoved:
        """What deleting `trees` would remove."""

    def _gc_prepare(self, rule: GcRule) -> GcRule:
        """Before a run's first delete: `rule` with what this store works out once for
        all its batches (PostgreSQL's `row_floor`)."""
        return rule

    def _gc_finish(self, rule: GcRule) -> list[str]:
        """After a run that looked at every candidate: drop what whole-table storage
        allows (PostgreSQL's event partitions); the names of what went."""
        return []

    @abstractmethod
    def _gc_delete(self, trees: list[GcTree], rule: GcRule) -> GcRemoved:
        """Delete each tree if, checked where it is deleted, `rule` still accepts its
        root and nothing in it changed since it was read; what went. Atomically per
        tree, or where a tree spans partitions (Redis buckets) root first and then
        each saga only once its parent went (redis_gc.py)."""

    def append_event(self, event: Event) -> None:
        """Append one event that changes no state (an observation, such as a refused claim)."""
        self.transact(event.saga_id, lambda state: Decision(events=[event]))

    def watch_finished(self, saga_id: str) -> FinishWatch | None:
        """A subscription to the saga's end (finished.py), to take before reading it;
        None when this store sends no notification, and the caller polls."""
        return None

    def exists(self) -> bool:
        """Whether this store was ever set up (read-only tools must not create one)."""
        return True

    def migrate(self) -> None:  # noqa: B027 - optional hook
        """Create or upgrade the schema (a no-op for stores without one)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    def dispose_after_fork(self) -> None:  # noqa: B027 - optional hook
        """In a forked child: forget connections inherited from the parent, unclosed."""
