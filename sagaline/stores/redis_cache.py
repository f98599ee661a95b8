"""The Redis store's per-process cache of step records, each valid for one version.

A decision reads the saga and all its steps (read_state.lua), but between two
decisions of a saga only the steps that were claimed or decided on changed: most
of a long saga's step records are the same. The read sends the version of every
step record this process holds; a step whose hash still has that version comes
back as its name alone, and the record held here is used. The others come back
whole and replace what is held. Every write of a step hash sets a new version
(write.lua, cas_step.lua), so an equal version means an equal record. A record
is held with its saga's `created_at`: a saga deleted and created again under the
same id starts with other records at the same versions, and is read whole.

Records handed out are shared between reads: the engine decides on copies
(work.py) and never changes a record it was given. The cache holds at most
`limit` step records, dropping the sagas least recently read first, and forgets a
saga once a decision ends it.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import replace
from typing import Any, NamedTuple

from ..forking import child_safe_lock
from ..records import Decision, SagaRecord, SagaState, StepRecord
from ..states import SAGA_TERMINAL
from .rows import from_row

DEFAULT_LIMIT = 4096


class _Held(NamedTuple):
    """What the cache holds of one saga."""

    created_at: float
    records: dict[str, StepRecord]  # step name -> record at its version
    # step name -> that record's version as snapshot.lua compares it, kept beside the
    # records so that each read sends them without converting every one again.
    versions: dict[str, str]


class StepCache:
    def __init__(self, limit: int = DEFAULT_LIMIT):
        self.limit = limit
        self._lock = child_safe_lock()
        self._sagas: OrderedDict[str, _Held] = OrderedDict()
        self._held = 0

    def known_versions(self, saga_id: str) -> dict[str, str]:
        """The version of each step record held of the saga, as read_state.lua compares it."""
        with self._lock:
            entry = self._sagas.get(saga_id)
            return {} if entry is None else dict(entry.versions)

    def state(
        self, saga_id: str, reply: str, sent: dict[str, str] | None
    ) -> tuple[SagaState, str] | None:
        """The saga, its steps and its `txn` counter from a snapshot (snapshot.lua) read
        with the versions `sent` (None: sent none, and hold nothing of it)."""
        if not reply:
            return None
        row, *step_rows = json.loads(reply)
        # `txn` is no record field: from_row ignores it, as any unknown field.
        saga = from_row(SagaRecord, row)
        if sent is None:
            steps = {s.name: s for s in (from_row(StepRecord, r) for r in step_rows)}
        else:
            steps = self.steps(saga_id, saga.created_at, step_rows, sent)
        return SagaState(saga, steps), str(row.get("txn", 0))

    def steps(
        self, saga_id: str, created_at: float, rows: list[Any], sent: dict[str, str]
    ) -> dict[str, StepRecord]:
        """The steps of a read_state.lua reply to the versions `sent`: a row is a step's
        fields, or the name of a step whose record at the version sent is current."""
        with self._lock:
            entry = self._sagas.get(saga_id)
            if entry is not None and entry.created_at == created_at:
                held, held_versions = entry.records, entry.versions
            else:
                held, held_versions = {}, {}
            steps: dict[str, StepRecord] = {}
            versions: dict[str, str] = {}
            for row in rows:
                if isinstance(row, str):
                    version = held_versions.get(row)
                    # Another thread's read may have replaced it since it was sent.
                    if version is None or version != sent.get(row):
                        raise StaleCache(saga_id)
                    steps[row] = held[row]
                    versions[row] = version
                else:
                    rec = from_row(StepRecord, row)
                    steps[rec.name] = rec
                    versions[rec.name] = str(rec.version)
            self._forget(saga_id)
            self._sagas[saga_id] = _Held(created_at, dict(steps), versions)
            self._held += len(steps)
            self._evict()
            return steps

    def written(self, saga_id: str, created_at: float, decision: Decision) -> None:
        """A decision was written: hold its step records at their new versions."""
        with self._lock:
            if decision.saga is not None and decision.saga.status in SAGA_TERMINAL:
                self._forget(saga_id)
                return
            entry = self._sagas.get(saga_id)
            if entry is None or entry.created_at != created_at:
                return
            for s in decision.steps:
                if s.name not in entry.records:
                    self._held += 1
                version = decision.expected_version(s) + 1
                entry.records[s.name] = replace(s, version=version)
                entry.versions[s.name] = str(version)

    def forget(self, saga_id: str) -> None:
        with self._lock:
            self._forget(saga_id)

    def _forget(self, saga_id: str) -> None:
        entry = self._sagas.pop(saga_id, None)
        if entry is not None:
            self._held -= len(entry.records)

    def _evict(self) -> None:
        while self._held > self.limit and len(self._sagas) > 1:
            _, dropped = self._sagas.popitem(last=False)
            self._held -= len(dropped.records)


def held_arg(sent: dict[str, str] | None) -> str:
    """The step versions sent, as snapshot.lua reads them: one JSON object of name ->
    version. One argument, not two per step: the client encodes each argument of a
    command in Python, which made a long saga's every read cost more per step."""
    return json.dumps(sent or {})


class StaleCache(Exception):
    """A reply named a record no longer held at the version sent: read again, whole."""
