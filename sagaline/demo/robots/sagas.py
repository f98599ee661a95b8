"""The exploration saga; compensations come from each step's @saga_step."""

from __future__ import annotations

from typing import Any

from sagaline import Retry, Saga

from .tasks import allocate_robots, explore_area, integrate_maps, plan_route

# Planning and exploring talk to robots over flaky links: a few quick retries
# absorb transient errors before the saga gives up and rolls back.
LINK_RETRY = Retry(max_attempts=3, backoff=0.2, factor=2.0)

exploration = (
    Saga("robot_exploration", timeout=300)
    .add_step(allocate_robots)
    .add_step(plan_route, retry=LINK_RETRY)
    .add_step(explore_area, retry=LINK_RETRY, timeout=120)
    .add_step(integrate_maps)
)

STEPS = [s.name for s in exploration.steps]


def exploration_input(
    area: str,
    robot_count: int = 2,
    *,
    fail_at: str | None = None,
    fail_rate: float = 0.0,
    seed: int = 0,
    slow: dict[str, float] | None = None,
    flaky: dict[str, int] | None = None,
) -> dict[str, Any]:
    """The saga input, failure injection included (every worker reads it from there)."""
    for label, names in (
        ("fail_at", [fail_at] if fail_at else []),
        ("slow", list(slow or {})),
        ("flaky", list(flaky or {})),
    ):
        unknown = [n for n in names if n not in STEPS]
        if unknown:
            raise ValueError(f"{label}: unknown step {unknown[0]!r} (one of {', '.join(STEPS)})")
    if not 0.0 <= fail_rate <= 1.0:
        raise ValueError(f"fail_rate must be between 0 and 1, got {fail_rate}")
    return {
        "area": area,
        "robot_count": robot_count,
        "fail_at": fail_at,
        "fail_rate": fail_rate,
        "seed": seed,
        "slow": dict(slow or {}),
        "flaky": dict(flaky or {}),
    }
