"""Retention: which finished sagas `Store.gc` may delete, and what it reports.

The unit of deletion is a saga *tree*: a root saga (one without a parent, or whose
parent is gone) with every child saga below it. A child saga is never deleted on
its own while its parent exists: the parent's compensation would roll the child
back, and would find nothing to undo. A tree is deleted when its root is finished
in one of the chosen statuses before the cutoff and every saga below it is
finished too (in any terminal status); otherwise the whole tree is kept.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ..exceptions import InputError
from ..states import SAGA_TERMINAL, SagaStatus

# What retention deletes unless told otherwise: FAILED sagas wait for an operator.
DEFAULT_GC_STATUSES = (SagaStatus.COMPLETED, SagaStatus.COMPENSATED)
DEFAULT_GC_BATCH = 500
MAX_GC_BATCH = 10_000
# Child sagas nest; deeper trees than this are kept (a loop guard, never reached in use).
MAX_TREE_DEPTH = 64


@dataclass(frozen=True)
class GcRule:
    """Which roots qualify: finished in one of `statuses` before `cutoff` (and, when
    `name` is given, of that saga name)."""

    cutoff: float
    statuses: frozenset[SagaStatus]
    name: str | None = None
    # Events below this `ts` need no row deletes (PostgreSQL drops their months whole
    # at the end of the run): worked out once per run by `Store._gc_prepare`.
    row_floor: float | None = None

    @classmethod
    def of(
        cls,
        cutoff: float,
        statuses: Iterable[SagaStatus | str],
        batch_size: int,
        name: str | None = None,
    ) -> GcRule:
        """The rule, checked: clear errors for a bad cutoff, status or batch size."""
        if isinstance(cutoff, bool) or not isinstance(cutoff, (int, float)) or cutoff != cutoff:
            raise InputError(f"gc cutoff must be a timestamp, got {cutoff!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int):
            raise InputError(f"gc batch size must be an int, got {batch_size!r}")
        if not 1 <= batch_size <= MAX_GC_BATCH:
            raise InputError(f"gc batch size must be 1..{MAX_GC_BATCH}, got {batch_size}")
        chosen = frozenset(
            _status(s) for s in ([statuses] if isinstance(statuses, str) else statuses)
        )
        if not chosen:
            raise InputError("gc needs at least one status")
        running = sorted(s.value for s in chosen - SAGA_TERMINAL)
        names = ", ".join(s.value.lower() for s in sorted(SAGA_TERMINAL))
        if running:
            raise InputError(f"gc deletes finished sagas only ({names}), not {', '.join(running)}")
        return cls(float(cutoff), chosen, name)

    def qualifies(self, status: SagaStatus, finished_at: float | None, updated_at: float) -> bool:
        """Whether a root saga read with these fields may go (`updated_at` stands in
        for a missing `finished_at`, which sagas stored before it existed lack)."""
        ended = updated_at if finished_at is None else finished_at
        return status in self.statuses and ended < self.cutoff


def _status(value: SagaStatus | str) -> SagaStatus:
    try:
        return SagaStatus(str(value).upper())
    except ValueError:
        names = ", ".join(s.value.lower() for s in sorted(SAGA_TERMINAL))
        raise InputError(f"gc: unknown status {value!r} (one of {names})") from None


@dataclass(frozen=True)
class GcTree:
    """A root saga and every saga below it, each with the status read."""

    root: str
    sagas: dict[str, SagaStatus]

    @property
    def finished(self) -> bool:
        return all(s in SAGA_TERMINAL for s in self.sagas.values())


@dataclass
class GcRemoved:
    """What one batch deleted (or, in a dry run, would delete)."""

    sagas: dict[SagaStatus, int] = field(default_factory=dict)
    steps: int = 0
    events: int = 0
    trees: int = 0

    def add_saga(self, status: SagaStatus) -> None:
        self.sagas[status] = self.sagas.get(status, 0) + 1


@dataclass
class GcReport:
    """What `Store.gc` deleted (or would): sagas per status, their steps and events."""

    cutoff: float
    dry_run: bool
    statuses: list[SagaStatus]
    sagas: dict[SagaStatus, int] = field(default_factory=dict)
    steps: int = 0
    events: int = 0
    batches: int = 0
    # Qualifying roots kept because a saga of their tree was still running (or one
    # changed between the read and the delete); looked at again by the next run.
    kept: int = 0
    # Where a run stopped by `max_batches` would go on (`Store.gc(after=...)`); None
    # when it looked at every candidate.
    cursor: str | None = None
    # Whole partitions of the events table dropped at the end of the run (PostgreSQL):
    # the events of deleted sagas in them are not in `events`.
    partitions: list[str] = field(default_factory=list)

    @property
    def more(self) -> bool:
        """Whether candidates were left when the run stopped."""
        return self.cursor is not None

    @property
    def total(self) -> int:
        return sum(self.sagas.values())

    def add(self, removed: GcRemoved, roots: int) -> None:
        """Count one batch that looked at `roots` roots and removed `removed`."""
        self.batches += 1
        self.kept += roots - removed.trees
        for status, n in removed.sagas.items():
            self.sagas[status] = self.sagas.get(status, 0) + n
        self.steps += removed.steps
        self.events += removed.events

    def as_dict(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "cutoff": self.cutoff,
            "statuses": [s.value for s in self.statuses],
            "sagas": self.total,
            "by_status": {
                s.value: self.sagas.get(s, 0) for s in sorted({*self.statuses, *self.sagas})
            },
            "steps": self.steps,
            "events": self.events,
            "batches": self.batches,
            "kept": self.kept,
            "more": self.more,
            "partitions_dropped": self.partitions,
        }


def removed_of(trees: Iterable[GcTree], steps: int, events: int) -> GcRemoved:
    """What deleting `trees` (with these counts of steps and events) removes."""
    removed = GcRemoved(steps=steps, events=events)
    for tree in trees:
        removed.trees += 1
        for status in tree.sagas.values():
            removed.add_saga(status)
    return removed


Children = Callable[[list[str]], list[tuple[str, str, SagaStatus]]]


def gather_trees(roots: list[tuple[str, SagaStatus]], children: Children) -> list[GcTree]:
    """Each root with the sagas below it, read level by level through `children`
    (parent ids -> (parent, child, child's status)); a tree deeper than
    MAX_TREE_DEPTH is left out (kept)."""
    trees = {sid: {sid: status} for sid, status in roots}
    root_of = {sid: sid for sid in trees}
    level = list(trees)
    for _ in range(MAX_TREE_DEPTH):
        if not level:
            break
        found, level = children(level), []
        for parent, child, status in found:
            root = root_of.get(parent)
            if root is None or child in root_of:
                continue
            root_of[child] = root
            trees[root][child] = status
            level.append(child)
    too_deep = {root_of[sid] for sid in level}
    return [GcTree(root, sagas) for root, sagas in trees.items() if root not in too_deep]
