"""The in-memory store: the reference implementation of the contract, for one process."""

from __future__ import annotations

import copy
import itertools
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ..forking import child_safe_lock
from ..records import (
    PHASE_COLUMNS,
    Decision,
    Event,
    Owner,
    SagaFilter,
    SagaRecord,
    SagaState,
    StepRecord,
)
from ..states import Phase, SagaStatus
from .base import DueItem, Snapshot, Store, matches_filter
from .retention import GcRemoved, GcRule, GcTree, removed_of


class MemoryStore(Store):
    def __init__(self, url: str = "memory://", **_: Any):
        self.url = url
        self._lock = child_safe_lock(reentrant=True)
        self._sagas: dict[str, SagaRecord] = {}
        self._steps: dict[str, dict[str, StepRecord]] = {}
        self._events: dict[str, list[Event]] = defaultdict(list)
        self._keys: dict[tuple[str, str], str] = {}
        self._seq = 0

    def _append(self, events: list[Event]) -> None:
        for e in events:
            self._seq += 1
            stored = copy.deepcopy(e)
            stored.seq = self._seq
            self._events[e.saga_id].append(stored)

    def _insert_saga(self, state: SagaState, events: list[Event]) -> tuple[SagaRecord, bool]:
        saga = state.saga
        with self._lock:
            if saga.idempotency_key is not None:
                existing = self._keys.get((saga.name, saga.idempotency_key))
                if existing is not None:
                    return copy.deepcopy(self._sagas[existing]), False
                self._keys[(saga.name, saga.idempotency_key)] = saga.saga_id
            self._sagas[saga.saga_id] = copy.deepcopy(saga)
            self._steps[saga.saga_id] = {n: copy.deepcopy(s) for n, s in state.steps.items()}
            self._append(events)
            return copy.deepcopy(saga), True

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
        with self._lock:
            rec = self._steps.get(saga_id, {}).get(step)
            if rec is None or not rec.is_dispatched(phase, attempt):
                return False
            cols = PHASE_COLUMNS[phase]
            setattr(rec, cols.status, cols.running)
            if phase is Phase.FORWARD:  # a compensation keeps the step's start time
                rec.started_at = now
            rec.lease_until = lease_until
            rec.due_at = lease_until
            rec.owner_node = None if owner is None else owner.node
            rec.owner_boot = None if owner is None else owner.boot
            rec.owner_pid = None if owner is None else owner.pid
            rec.version += 1
            self._append([Event(saga_id, cols.started, now, step, attempt, phase.value)])
            return True

    def renew_lease(
        self, saga_id: str, step: str, phase: Phase, attempt: int, lease_until: float
    ) -> bool:
        with self._lock:
            rec = self._steps.get(saga_id, {}).get(step)
            if rec is None or not rec.is_running(phase, attempt):
                return False
            rec.lease_until = lease_until
            rec.due_at = lease_until
            rec.version += 1
            return True

    @contextmanager
    def _locked(self, saga_id: str) -> Iterator[Snapshot | None]:
        # Decide under the lock, as the SQL store decides under the saga's row lock:
        # two branches finishing together must see each other, or neither would
        # dispatch the step that joins them.
        with self._lock:
            state = self._read(saga_id)
            yield (
                None
                if state is None
                else Snapshot(state, lambda decision: self._write(saga_id, decision))
            )

    def _write(self, saga_id: str, decision: Decision) -> bool:
        # Under the lock nothing else writes, so versions differ only when the
        # decision was made on records of another read.
        if not self._versions_match(saga_id, decision):
            return False
        if decision.saga is not None:
            saga = copy.deepcopy(decision.saga)
            saga.version = decision.saga_version + 1
            self._sagas[saga_id] = saga
        for s in decision.steps:
            rec = copy.deepcopy(s)
            rec.version = decision.expected_version(s) + 1
            self._steps[saga_id][s.name] = rec
        self._append(decision.events)
        return True

    def _versions_match(self, saga_id: str, decision: Decision) -> bool:
        if decision.saga is not None and self._sagas[saga_id].version != decision.saga_version:
            return False
        steps = self._steps[saga_id]
        return all(steps[n].version == v for n, v in decision.step_versions.items())

    def _read(self, saga_id: str) -> SagaState | None:
        saga = self._sagas.get(saga_id)
        if saga is None:
            return None
        return SagaState(
            copy.deepcopy(saga), {n: copy.deepcopy(s) for n, s in self._steps[saga_id].items()}
        )

    def _get_saga(self, saga_id: str) -> SagaRecord | None:
        with self._lock:
            saga = self._sagas.get(saga_id)
            return copy.deepcopy(saga) if saga else None

    def _get_steps(self, saga_id: str) -> list[StepRecord]:
        with self._lock:
            steps = self._steps.get(saga_id, {})
            return sorted((copy.deepcopy(s) for s in steps.values()), key=lambda s: s.position)

    def _history(self, saga_id: str, after_seq: int, limit: int | None) -> list[Event]:
        with self._lock:
            after = (e for e in self._events.get(saga_id, []) if (e.seq or 0) > after_seq)
            return [copy.deepcopy(e) for e in itertools.islice(after, limit)]

    def _list_sagas(self, flt: SagaFilter) -> list[SagaRecord]:
        with self._lock:
            rows = [s for s in self._sagas.values() if matches_filter(s, flt)]
        rows.sort(key=lambda s: (s.created_at, s.saga_id), reverse=True)
        return [copy.deepcopy(s) for s in rows[flt.offset : flt.offset + flt.limit]]

    def _count_by_status(self, name: str | None) -> dict[SagaStatus, int]:
        counts = dict.fromkeys(SagaStatus, 0)
        with self._lock:
            for s in self._sagas.values():
                if name is None or s.name == name:
                    counts[s.status] += 1
        return counts

    def find_due(self, now: float, limit: int = 200) -> list[DueItem]:
        with self._lock:
            items = [
                DueItem(s.saga_id, None, s.due_at)
                for s in self._sagas.values()
                if s.due_at is not None and s.due_at <= now
            ]
            for saga_id, steps in self._steps.items():
                items += [
                    DueItem(saga_id, r.name, r.due_at)
                    for r in steps.values()
                    if r.due_at is not None and r.due_at <= now
                ]
        items.sort(key=lambda d: d.due_at)
        return items[:limit]

    def find_claimed(self, node: str, limit: int = 200) -> list[StepRecord]:
        with self._lock:
            found = [
                copy.deepcopy(r)
                for steps in self._steps.values()
                for r in steps.values()
                if r.owner_node == node and r.running_phase is not None
            ]
        return found[:limit]

    # -- retention (retention.py) --------------------------------------------------------

    def _gc_candidates(
        self, rule: GcRule, name: str | None, limit: int, after: str | None
    ) -> tuple[list[tuple[str, SagaStatus]], str | None]:
        with self._lock:
            found = sorted(
                (s.saga_id, s.status)
                for s in self._sagas.values()
                if (after is None or s.saga_id > after)
                and (name is None or s.name == name)
                and (s.parent_saga_id is None or s.parent_saga_id not in self._sagas)
                and rule.qualifies(s.status, s.finished_at, s.updated_at)
            )
        page = found[:limit]
        return page, (page[-1][0] if len(found) > limit else None)

    def _gc_children(self, ids: list[str]) -> list[tuple[str, str, SagaStatus]]:
        parents = set(ids)
        with self._lock:
            return [
                (str(s.parent_saga_id), s.saga_id, s.status)
                for s in self._sagas.values()
                if s.parent_saga_id in parents
            ]

    def _gc_count(self, trees: list[GcTree]) -> GcRemoved:
        ids = [sid for t in trees for sid in t.sagas]
        with self._lock:
            steps = sum(len(self._steps.get(sid, {})) for sid in ids)
            events = sum(len(self._events.get(sid, [])) for sid in ids)
        return removed_of(trees, steps, events)

    def _gc_delete(self, trees: list[GcTree], rule: GcRule) -> GcRemoved:
        with self._lock:
            children: dict[str, set[str]] = defaultdict(set)
            for s in self._sagas.values():
                if s.parent_saga_id is not None:
                    children[s.parent_saga_id].add(s.saga_id)
            gone = [t for t in trees if self._still(t, rule, children)]
            ids = [sid for t in gone for sid in t.sagas]
            removed = self._gc_count(gone)
            for sid in ids:
                saga = self._sagas.pop(sid)
                if saga.idempotency_key is not None:
                    self._keys.pop((saga.name, saga.idempotency_key), None)
                self._steps.pop(sid, None)
                self._events.pop(sid, None)
            return removed

    def _still(self, tree: GcTree, rule: GcRule, children: dict[str, set[str]]) -> bool:
        """Whether the tree is as it was read (the same sagas in the same statuses, no
        child added) and `rule` accepts its root."""
        root = self._sagas.get(tree.root)
        if root is None or not rule.qualifies(root.status, root.finished_at, root.updated_at):
            return False
        members = {sid: self._sagas[sid].status for sid in tree.sagas if sid in self._sagas}
        below = set().union(*(children[sid] for sid in tree.sagas))
        return members == tree.sagas and below <= tree.sagas.keys()
