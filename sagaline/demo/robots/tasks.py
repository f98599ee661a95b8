"""The fleet's services as Celery tasks: each step and compensation changes real rows.

Failure injection comes from the saga input, so that every worker honours it:
`fail_at` (the step applies its change, then fails permanently: its own
change is compensated too), `fail_rate` + `seed` (each attempt of each step
fails with that probability, reproducibly), `flaky` ({step: n}: the first n
attempts fail with a transient error) and `slow` ({step: seconds}).
"""

from __future__ import annotations

import logging
import random
import time
import zlib
from typing import Any

import sqlalchemy as sa

import sagaline
from sagaline import StepResponse, saga_step

from .celery_app import app
from .models import engine, maps, missions, robots, routes

log = logging.getLogger(__name__)


# -- failure injection ------------------------------------------------------------------


def _before(step: str, options: dict[str, Any]) -> None:
    """Injected delays and transient failures: they strike before the step changes anything."""
    slow = options.get("slow") or {}
    if step in slow:
        time.sleep(float(slow[step]))
    attempt = sagaline.current_step().attempt
    if attempt <= int((options.get("flaky") or {}).get(step, 0)):
        raise ConnectionError(f"{step}: robot link dropped (injected, attempt {attempt})")
    rate = float(options.get("fail_rate") or 0.0)
    # Seeded by (seed, step, attempt): the same input fails the same way on any worker.
    if rate and random.Random(f"{options.get('seed', 0)}:{step}:{attempt}").random() < rate:
        raise RuntimeError(
            f"{step}: random failure (injected, fail_rate={rate:g}, attempt {attempt})"
        )


def _after(step: str, options: dict[str, Any], response: StepResponse) -> StepResponse:
    """`fail_at`: the change is made, then the step fails for good, so it is undone too."""
    if options.get("fail_at") == step:
        raise StepResponse.permanent_failure(
            f"{step}: failed after applying its change (injected, fail_at)",
            compensation_data=response.compensation_data,
        )
    return response


def _digest(*parts: Any) -> int:
    return zlib.crc32(":".join(map(str, parts)).encode())


# -- steps ------------------------------------------------------------------------------


@app.task(name="robots.release_robots")
def release_robots(saga_id: str, compensation_data: dict[str, Any]) -> None:
    with engine().begin() as conn:
        conn.execute(
            robots.update()
            .where(
                robots.c.id.in_(compensation_data["robot_ids"]), robots.c.assigned_saga == saga_id
            )
            .values(status="idle", assigned_saga=None)
        )
    log.info("saga %s: released robots %s", saga_id, compensation_data["robot_ids"])


@saga_step(compensate=release_robots)
@app.task(name="robots.allocate_robots")
def allocate_robots(saga_id: str, robot_count: int, **options: Any) -> StepResponse:
    _before("allocate_robots", options)
    with engine().begin() as conn:
        # A redelivered message finds the robots it already holds.
        held = (
            conn.execute(
                sa.select(robots.c.id)
                .where(robots.c.assigned_saga == saga_id)
                .order_by(robots.c.id)
            )
            .scalars()
            .all()
        )
        if not held:
            idle = (
                conn.execute(
                    sa.select(robots.c.id)
                    .where(robots.c.status == "idle")
                    .order_by(robots.c.id)
                    .limit(robot_count)
                    .with_for_update(skip_locked=True)
                )
                .scalars()
                .all()
            )
            if len(idle) < robot_count:
                raise StepResponse.permanent_failure(
                    f"only {len(idle)} idle robots, {robot_count} needed"
                )
            conn.execute(
                robots.update()
                .where(robots.c.id.in_(idle))
                .values(status="allocated", assigned_saga=saga_id)
            )
            held = idle
    ids = list(held)
    log.info("saga %s: allocated robots %s", saga_id, ids)
    return _after(
        "allocate_robots",
        options,
        StepResponse(output={"robot_ids": ids}, compensation_data={"robot_ids": ids}),
    )


@app.task(name="robots.discard_route")
def discard_route(compensation_data: dict[str, Any]) -> None:
    with engine().begin() as conn:
        conn.execute(routes.delete().where(routes.c.key == compensation_data["route_key"]))


@saga_step(compensate=discard_route)
@app.task(name="robots.plan_route")
def plan_route(saga_id: str, area: str, robot_ids: list[int], **options: Any) -> StepResponse:
    _before("plan_route", options)
    key = sagaline.current_step().idempotency_key
    with engine().begin() as conn:
        route = conn.execute(sa.select(routes).where(routes.c.key == key)).mappings().first()
        if route is None:
            waypoints = [
                [rid, _digest(area, rid) % 100, _digest(rid, area) % 100] for rid in robot_ids
            ]
            conn.execute(
                routes.insert().values(key=key, saga_id=saga_id, area=area, waypoints=waypoints)
            )
            route = conn.execute(sa.select(routes).where(routes.c.key == key)).mappings().one()
    return _after(
        "plan_route",
        options,
        StepResponse(
            output={"route_id": route["id"], "waypoints": len(route["waypoints"])},
            compensation_data={"route_key": key},
        ),
    )


@app.task(name="robots.abort_exploration")
def abort_exploration(compensation_data: dict[str, Any]) -> None:
    with engine().begin() as conn:
        conn.execute(
            missions.update()
            .where(missions.c.key == compensation_data["mission_key"])
            .values(status="aborted")
        )


@saga_step(compensate=abort_exploration)
@app.task(name="robots.explore_area")
def explore_area(
    saga_id: str, area: str, robot_ids: list[int], route_id: int, **options: Any
) -> StepResponse:
    _before("explore_area", options)
    key = sagaline.current_step().idempotency_key
    with engine().begin() as conn:
        mission = conn.execute(sa.select(missions).where(missions.c.key == key)).mappings().first()
        if mission is None:
            cells = sum(20 + _digest(area, route_id, rid) % 30 for rid in robot_ids)
            conn.execute(
                missions.insert().values(
                    key=key, saga_id=saga_id, area=area, status="explored", cells=cells
                )
            )
        else:
            cells = mission["cells"]
    return _after(
        "explore_area",
        options,
        StepResponse(
            output={"mission_key": key, "cells": cells}, compensation_data={"mission_key": key}
        ),
    )


@app.task(name="robots.rollback_integration")
def rollback_integration(saga_id: str, compensation_data: dict[str, Any]) -> None:
    with engine().begin() as conn:
        # Deleting this version makes the area's previous map current again.
        conn.execute(maps.delete().where(maps.c.key == compensation_data["map_key"]))
        conn.execute(
            missions.update()
            .where(
                missions.c.key == compensation_data["mission_key"], missions.c.status == "completed"
            )
            .values(status="explored")
        )
        # The robots integrate_maps sent home are this saga's again, as before it ran.
        conn.execute(
            robots.update()
            .where(
                robots.c.id.in_(compensation_data["robot_ids"]),
                robots.c.status == "idle",
                robots.c.assigned_saga.is_(None),
            )
            .values(status="allocated", assigned_saga=saga_id)
        )


@saga_step(compensate=rollback_integration)
@app.task(name="robots.integrate_maps")
def integrate_maps(
    saga_id: str, area: str, robot_ids: list[int], mission_key: str, cells: int, **options: Any
) -> StepResponse:
    _before("integrate_maps", options)
    key = sagaline.current_step().idempotency_key
    with engine().begin() as conn:
        row = conn.execute(sa.select(maps).where(maps.c.key == key)).mappings().first()
        if row is None:
            current = conn.execute(
                sa.select(maps.c.version, maps.c.cells)
                .where(maps.c.area == area)
                .order_by(maps.c.version.desc())
                .limit(1)
            ).first()
            version, known = (current[0] + 1, current[1]) if current else (1, 0)
            conn.execute(
                maps.insert().values(
                    key=key, saga_id=saga_id, area=area, version=version, cells=known + cells
                )
            )
            conn.execute(
                missions.update().where(missions.c.key == mission_key).values(status="completed")
            )
            # The mission is over: its robots go back to the pool.
            conn.execute(
                robots.update()
                .where(robots.c.assigned_saga == saga_id)
                .values(status="idle", assigned_saga=None)
            )
            row = conn.execute(sa.select(maps).where(maps.c.key == key)).mappings().one()
    return _after(
        "integrate_maps",
        options,
        StepResponse(
            output={"map_version": row["version"], "map_cells": row["cells"]},
            compensation_data={"map_key": key, "mission_key": mission_key, "robot_ids": robot_ids},
        ),
    )
