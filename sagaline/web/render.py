"""What the saga page draws, computed on the server: the "why" box, the DAG, the timeline."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from .. import ops
from ..states import SagaStatus
from ..timeline import format_duration as duration

__all__ = [
    "FAILED_KINDS",
    "Drawn",
    "Why",
    "ago",
    "dag",
    "duration",
    "timeline",
    "waits",
    "when",
    "why",
]

FAILED_KINDS = {
    "step_attempt_failed",
    "step_failed",
    "step_abandoned",
    "compensation_attempt_failed",
    "compensation_failed",
    "saga_failed",
    "saga_deadline_exceeded",
    "saga_compensating",
}
_DISPATCH_KINDS = {
    "step_dispatched",
    "step_redispatched",
    "compensation_dispatched",
    "compensation_redispatched",
}


def ago(ts: float | None, now: float) -> str:
    if ts is None:
        return "-"
    seconds = max(0.0, now - ts)
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def when(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


@dataclass
class Why:
    """The box at the top of the page: what went wrong, or what the saga waits on."""

    kind: str  # failure | waiting | done
    headline: str
    step: str | None = None
    attempt: str | None = None
    error: str | None = None
    compensations: list[dict[str, Any]] = field(default_factory=list)
    attention: dict[str, str] = field(default_factory=dict)
    waits: list[str] = field(default_factory=list)


def why(view: ops.SagaView, shapes: dict[str, ops.StepShape], now: float) -> Why:
    saga = view.saga
    if saga.status is SagaStatus.COMPLETED:
        return Why("done", f"Completed in {duration((saga.finished_at or now) - saga.created_at)}")
    attempts = ops.step_attempts(view.history)
    comps = [
        {
            "step": a.step,
            "attempt": a.attempt,
            "outcome": a.outcome,
            "error": a.error,
            "when": when(a.finished_at or a.started_at),
        }
        for a in attempts
        if a.phase == "compensate"
    ]
    if (
        saga.status in (SagaStatus.COMPENSATING, SagaStatus.COMPENSATED, SagaStatus.FAILED)
        or saga.error
    ):
        step = saga.failed_step
        rec = next((s for s in view.steps if s.name == step), None)
        shape = shapes.get(step or "")
        attempt = None
        if rec is not None:
            attempt = f"attempt {rec.attempt} of {shape.max_attempts if shape else '?'}"
        headline = {
            SagaStatus.COMPENSATED: "Rolled back: every applied step was compensated",
            SagaStatus.FAILED: "Needs attention: a compensation kept failing",
            SagaStatus.COMPENSATING: "Rolling back",
        }.get(saga.status, "Failing")
        actors = [
            e.detail.get("actor")
            for e in view.history
            if e.kind == ops.AUDIT_EVENT and e.detail.get("action") == "cancel"
        ]
        if actors:
            headline += f" (cancelled by {actors[-1]})"
        error = (rec.error if rec is not None and rec.error else None) or saga.error
        result = Why(
            "failure", headline, step, attempt, error, comps, ops.compensation_failures(view.steps)
        )
        if saga.status is SagaStatus.COMPENSATING:
            result.waits = waits(view, shapes, now)
        return result
    return Why("waiting", "Running", waits=waits(view, shapes, now))


def waits(view: ops.SagaView, shapes: dict[str, ops.StepShape], now: float) -> list[str]:
    """One line per step in flight: what it is waiting for, and since when."""
    dispatched: dict[tuple[str, str], float] = {}
    for ev in view.history:
        if ev.kind in _DISPATCH_KINDS and ev.step and ev.phase:
            dispatched[(ev.step, ev.phase)] = ev.ts
    lines = []
    for s in view.steps:
        for phase, status, attempt in (
            ("forward", s.status.value, s.attempt),
            ("compensate", s.comp_status and s.comp_status.value, s.comp_attempt),
        ):
            if status not in ("DISPATCHED", "RUNNING"):
                continue
            label = s.name if phase == "forward" else f"compensation of {s.name}"
            shape = shapes.get(s.name)
            most = (
                "?"
                if shape is None
                else (shape.max_attempts if phase == "forward" else shape.compensation_max_attempts)
            )
            since = s.started_at if status == "RUNNING" else dispatched.get((s.name, phase))
            parts = [f"{label} {status} {ago(since, now)} (attempt {attempt} of {most})"]
            if s.redispatches:
                parts.append(f"published again {s.redispatches} times")
            if status == "DISPATCHED" and s.due_at:
                parts.append(f"next check or retry at {when(s.due_at)}")
            if status == "RUNNING" and s.lease_until:
                parts.append(f"lease until {when(s.lease_until)}")
            if s.owner_node and status == "RUNNING":
                parts.append(f"on {s.owner_node} pid {s.owner_pid}")
            lines.append(", ".join(parts))
    if view.saga.deadline:
        lines.append(f"saga deadline at {when(view.saga.deadline)}")
    return lines


# -- the DAG ------------------------------------------------------------------------------

NODE_W, NODE_H, GAP_X, GAP_Y, PAD = 190, 40, 40, 18, 10
# What the templates draw (a node, an edge, a bar): attributes, which Jinja reads at
# once, where a dict's keys cost it a failed attribute lookup each (hundreds per page).
Drawn = SimpleNamespace


def dag(view: ops.SagaView, shapes: dict[str, ops.StepShape]) -> dict[str, Any]:
    """Nodes in columns by depth. The edges are the dependencies each step kept in the
    store when the saga started (or its definition's, in this process); a saga from
    before steps kept them, without its definition here, is drawn as a chain in step
    order."""
    ordered = sorted(view.steps, key=lambda s: s.position)
    names = [s.name for s in ordered]
    known = bool(shapes) or all(s.depends_on is not None for s in ordered)
    deps = {}
    for i, s in enumerate(ordered):
        if s.name in shapes:
            wanted = shapes[s.name].depends_on
        elif s.depends_on is not None:
            wanted = s.depends_on
        else:
            wanted = [names[i - 1]] if i else []
        deps[s.name] = [d for d in wanted if d in names[:i]]  # positions are topological
    depth: dict[str, int] = {}
    for n in names:  # dependencies come first
        depth[n] = 1 + max((depth.get(d, 0) for d in deps[n]), default=-1)
    rows: dict[int, int] = {}
    pos: dict[str, tuple[int, int]] = {}
    for n in names:
        col = depth[n]
        pos[n] = (PAD + col * (NODE_W + GAP_X), PAD + rows.get(col, 0) * (NODE_H + GAP_Y))
        rows[col] = rows.get(col, 0) + 1
    steps = {s.name: s for s in view.steps}
    nodes = [
        Drawn(
            name=n,
            x=x,
            y=y,
            w=NODE_W,
            h=NODE_H,
            status=steps[n].status.value,
            comp=_value(steps[n].comp_status),
            attempt=steps[n].attempt,
        )
        for n, (x, y) in pos.items()
    ]
    edges = [
        Drawn(
            source=d,
            target=n,
            x1=pos[d][0] + NODE_W,
            y1=pos[d][1] + NODE_H / 2,
            x2=pos[n][0],
            y2=pos[n][1] + NODE_H / 2,
        )
        for n in names
        for d in deps[n]
    ]
    width = PAD * 2 + (max(depth.values(), default=0) + 1) * (NODE_W + GAP_X) - GAP_X
    height = PAD * 2 + max(rows.values(), default=1) * (NODE_H + GAP_Y) - GAP_Y
    return {"nodes": nodes, "edges": edges, "width": width, "height": height, "known": known}


def _value(status: Any) -> str:
    return "" if status is None else str(status.value)


# -- the timeline -------------------------------------------------------------------------

LABEL_W, CHART_W, ROW_H = 190, 640, 22


def timeline(view: ops.SagaView, now: float) -> dict[str, Any]:
    """One row per attempt: queue wait (dispatched -> claimed) then the run; the
    compensation lane follows the forward one."""
    sent: dict[tuple[str, str, int], float] = {}
    for ev in view.history:
        if ev.kind in _DISPATCH_KINDS and ev.step and ev.phase and ev.attempt is not None:
            sent.setdefault((ev.step, ev.phase, ev.attempt), ev.ts)
    attempts = ops.step_attempts(view.history)
    start = view.saga.created_at
    end = (
        max(
            [
                view.saga.finished_at or 0.0,
                now if view.saga.finished_at is None else 0.0,
                *[a.finished_at or 0.0 for a in attempts],
            ]
        )
        or start + 1
    )
    span = max(end - start, 1e-3)

    def x(ts: float) -> float:
        return round(LABEL_W + (ts - start) / span * CHART_W, 1)

    rows = []
    ordered = [a for a in attempts if a.phase == "forward"] + [
        a for a in attempts if a.phase != "forward"
    ]
    for i, a in enumerate(ordered):
        began = a.started_at or a.finished_at or start
        queued = sent.get((a.step, a.phase, a.attempt), began)
        finished = a.finished_at or now
        rows.append(
            Drawn(
                y=i * ROW_H,
                label=f"{'↩ ' if a.phase != 'forward' else ''}{a.step} #{a.attempt}",
                lane=a.phase,
                outcome=a.outcome,
                wait_x=x(queued),
                wait_w=max(x(began) - x(queued), 0.0),
                run_x=x(began),
                run_w=max(x(finished) - x(began), 1.0),
                title=f"{a.step} attempt {a.attempt} ({a.phase}): waited "
                f"{duration(began - queued)}, ran {duration(finished - began)}, "
                f"{a.outcome}" + (f": {a.error}" if a.error else ""),
            )
        )
    return {
        "rows": rows,
        "width": LABEL_W + CHART_W + 10,
        "height": max(len(rows), 1) * ROW_H + 20,
        "span": duration(span),
        "axis_y": max(len(rows), 1) * ROW_H + 14,
    }
