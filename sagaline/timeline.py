"""A saga in the terminal: its steps and its history as a Rich timeline (CLI `show`, demo)."""

from __future__ import annotations

from typing import Any

from rich.table import Table
from rich.text import Text

from .ops import SagaView, compensation_failures, first_line, step_attempts
from .records import Event
from .states import EventKind, SagaStatus

STATUS_STYLES = {
    "PENDING": "dim",
    "RUNNING": "cyan",
    "DISPATCHED": "cyan",
    "COMPLETED": "green",
    "SUCCEEDED": "green",
    "COMPENSATED": "yellow",
    "COMPENSATING": "yellow",
    "FAILED": "bold red",
    "COMPENSATION_FAILED": "bold red",
    "SKIPPED": "dim",
    "CANCELLED": "dim",
}

# Events that only say a message was sent; the compact timeline leaves them out.
_PLUMBING = {
    EventKind.STEP_DISPATCHED,
    EventKind.COMPENSATION_DISPATCHED,
    EventKind.STEP_STARTED,
    EventKind.COMPENSATION_STARTED,
}


def status_text(status: Any) -> Text:
    value = str(status.value if hasattr(status, "value") else status)
    return Text(value, style=STATUS_STYLES.get(value, ""))


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{seconds:.2f}s"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes}m{rest:02d}s"


def describe(event: Event) -> tuple[str, str, str]:
    """(marker, text, style) for one history event: → forward, ← compensation, • saga."""
    d = event.detail
    att = f"attempt {event.attempt}" if event.attempt else ""
    error = first_line(d.get("error")) if d.get("error") else ""
    kind = event.kind
    texts: dict[EventKind | str, tuple[str, str, str]] = {
        EventKind.SAGA_STARTED: ("•", "saga started", "bold"),
        EventKind.STEP_DISPATCHED: ("→", "dispatched", "dim"),
        EventKind.STEP_REDISPATCHED: ("→", f"dispatched again ({att}, message may be lost)", "dim"),
        EventKind.STEP_STARTED: ("→", f"{att} started", "dim"),
        EventKind.STEP_SUCCEEDED: ("→", f"succeeded ({att})", "green"),
        EventKind.STEP_ATTEMPT_FAILED: (
            "→",
            f"{att} failed: {error}; retry in {d.get('retry_in', 0):g}s",
            "red",
        ),
        EventKind.STEP_FAILED: ("→", f"FAILED ({att}): {error}", "bold red"),
        EventKind.STEP_ABANDONED: ("→", f"abandoned ({att}): {d.get('reason', '')}", "red"),
        EventKind.STEP_SKIPPED: ("→", "skipped (condition false)", "dim"),
        EventKind.STEP_CANCELLED: ("→", "cancelled (not run)", "dim"),
        EventKind.TRANSFORM_APPLIED: ("→", "transform applied", "dim"),
        EventKind.PIVOT_PASSED: ("•", "pivot passed: failures now retry forward", "bold"),
        EventKind.SAGA_COMPENSATING: ("•", f"rolling back: {d.get('cause') or ''}", "bold yellow"),
        EventKind.SAGA_DEADLINE_EXCEEDED: ("•", "deadline exceeded", "bold red"),
        EventKind.COMPENSATION_DISPATCHED: ("←", "compensation dispatched", "dim"),
        EventKind.COMPENSATION_REDISPATCHED: ("←", f"compensation dispatched again ({att})", "dim"),
        EventKind.COMPENSATION_STARTED: ("←", f"compensation {att} started", "dim"),
        EventKind.COMPENSATION_SUCCEEDED: ("←", f"compensated ({att})", "yellow"),
        EventKind.COMPENSATION_ATTEMPT_FAILED: (
            "←",
            f"compensation {att} failed: {error}; retry in {d.get('retry_in', 0):g}s",
            "red",
        ),
        EventKind.COMPENSATION_FAILED: ("←", f"COMPENSATION FAILED ({att}): {error}", "bold red"),
        EventKind.SAGA_COMPLETED: ("•", "saga COMPLETED", "bold green"),
        EventKind.SAGA_COMPENSATED: (
            "•",
            "saga COMPENSATED: every applied step undone",
            "bold yellow",
        ),
        EventKind.SAGA_FAILED: ("•", f"saga FAILED: {d.get('reason', '')}", "bold red"),
        EventKind.SAGA_RESUMED: ("•", f"resumed by operator ({d.get('mode', '')})", "bold"),
        EventKind.DEFINITION_MISMATCH: ("!", "a worker has other code for this saga", "bold red"),
        EventKind.TASK_UNREGISTERED: (
            "!",
            f"worker {d.get('worker')} has no task "
            f"{d.get('task')!r}: it dropped the message ({att})",
            "bold red",
        ),
    }
    return texts.get(kind, ("•", str(kind).replace("_", " "), ""))


def render_timeline(
    view: SagaView, *, compact: bool = False, labels: dict[str, str] | None = None
) -> Table:
    """One row per history event, times relative to the saga's start.

    `compact` leaves out dispatch and start events; `labels` names the task run
    for a step's compensation (e.g. {"plan_route": "discard_route"}) when known.
    """
    table = Table(
        title=f"timeline of {view.name} {view.saga_id}",
        title_justify="left",
        show_edge=False,
        pad_edge=False,
        box=None,
        header_style="bold",
    )
    table.add_column("+time", justify="right", no_wrap=True)
    table.add_column("", no_wrap=True)
    table.add_column("step", no_wrap=True)
    table.add_column("event", overflow="fold")
    start = view.saga.created_at
    for ev in view.history:
        if compact and ev.kind in _PLUMBING:
            continue
        marker, text, style = describe(ev)
        step = ev.step or ""
        if labels and ev.step and ev.phase == "compensate" and ev.step in labels:
            step = f"{ev.step} ({labels[ev.step]})"
        table.add_row(f"+{ev.ts - start:.3f}s", marker, step, Text(text, style=style))
    return table


def render_steps(view: SagaView) -> Table:
    """The saga's steps: status, attempts, durations, errors and compensations."""
    attempts = step_attempts(view.history)
    table = Table(title=f"{view.name} {view.saga_id}", title_justify="left", header_style="bold")
    for col in ("step", "status", "attempts", "duration"):
        table.add_column(col, no_wrap=True)
    table.add_column("error", overflow="fold", ratio=2)
    for col in ("compensation", "attempts", "duration"):
        table.add_column(col, no_wrap=True)
    table.add_column("error", overflow="fold", ratio=1)
    for rec in view.steps:
        backward = [a for a in attempts if a.step == rec.name and a.phase == "compensate"]
        duration = (
            rec.finished_at - rec.started_at
            if rec.finished_at is not None and rec.started_at is not None
            else None
        )
        table.add_row(
            rec.name,
            status_text(rec.status),
            str(rec.attempt or "-"),
            format_duration(duration),
            first_line(rec.error) or "",
            status_text(rec.comp_status) if rec.comp_status else Text("-", style="dim"),
            str(rec.comp_attempt or "-"),
            format_duration(sum(a.duration or 0.0 for a in backward) if backward else None),
            first_line(rec.comp_error) or "",
        )
    return table


def render_summary(view: SagaView) -> Text:
    """Status, duration and cause; for a FAILED saga, each compensation that failed."""
    saga = view.saga
    end = saga.finished_at
    text = Text()
    text.append(f"{saga.name} {saga.saga_id}  ")
    text.append_text(status_text(saga.status))
    if end is not None:
        text.append(f"  in {format_duration(end - saga.created_at)}")
    if saga.status is not SagaStatus.COMPLETED and saga.error:
        at = f" at {saga.failed_step}" if saga.failed_step else ""
        text.append(f"\ncause{at}: {saga.error}", style="red")
    if saga.status is SagaStatus.FAILED:
        for name, why in compensation_failures(view.steps).items():
            text.append(f"\ncompensation of {name} failed: {why}", style="bold red")
    return text
